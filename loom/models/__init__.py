from loom.models.llama import LlamaConfig, RopeScaling, Transformer, build_model
from loom.models.registry import MODELS, get_model_config

__all__ = ["LlamaConfig", "RopeScaling", "Transformer", "build_model", "MODELS", "get_model_config"]
