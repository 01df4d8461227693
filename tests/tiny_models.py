"""Test-side alias of the in-package tiny model builders."""
from dstp.bench.tiny_models import *  # noqa: F401,F403
from dstp.bench.tiny_models import _init  # noqa: F401
