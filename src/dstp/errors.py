"""Errors with messages that name the problem, raised before anything reaches torch."""


class DSTPError(ValueError):
    """Base class for dstp's user-facing errors."""


class InputError(DSTPError):
    """Bad images, prompts or processed inputs."""


class ConfigError(DSTPError):
    """Bad pruning, DSTP or generation configuration."""


class UnsupportedModelError(DSTPError):
    """The checkpoint's architecture has no adapter."""


class UnsupportedEnvironmentError(DSTPError):
    """An installed dependency (transformers, torch) that dstp is known not to work with."""
