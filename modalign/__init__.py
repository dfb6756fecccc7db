"""modalign: modular multimodal LLMs on one shared core."""

from modalign.config import ConnectorConfig, CrossAttentionConfig, LLMConfig, MLLMConfig, VisionConfig
from modalign.models.mllm import MLLM, MLLMOutput, PlaceholderMismatch

__version__ = "0.1.0"

__all__ = [
    "MLLM",
    "ConnectorConfig",
    "CrossAttentionConfig",
    "LLMConfig",
    "MLLMConfig",
    "MLLMOutput",
    "PlaceholderMismatch",
    "VisionConfig",
    "__version__",
]
