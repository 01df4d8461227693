"""dstp: decoding-stage shift-aware visual token pruning for Hugging Face multimodal LLMs."""
from dstp.api import GenerateResult, Pipeline, from_model, load
from dstp.config import DSTPConfig, EngineConfig, GenerationConfig, PruneConfig, VisionPulseConfig
from dstp.errors import ConfigError, DSTPError, InputError, UnsupportedModelError

__version__ = "0.1.0"

__all__ = ["load", "from_model", "Pipeline", "GenerateResult", "PruneConfig", "DSTPConfig", "VisionPulseConfig",
           "GenerationConfig", "EngineConfig",
           "DSTPError", "ConfigError", "InputError", "UnsupportedModelError"]
