"""dstp: decoding-stage shift-aware visual token pruning for Hugging Face multimodal LLMs."""
from dstp.config import DSTPConfig, GenerationConfig, PruneConfig
from dstp.errors import ConfigError, DSTPError, InputError, UnsupportedModelError

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a supported model for dstp generation; see `dstp.api.load`."""
    from dstp.api import load as _load

    return _load(*args, **kwargs)


def from_model(*args, **kwargs):
    from dstp.api import from_model as _from_model

    return _from_model(*args, **kwargs)


__all__ = ["load", "from_model", "PruneConfig", "DSTPConfig", "GenerationConfig", "DSTPError", "ConfigError",
           "InputError", "UnsupportedModelError"]
