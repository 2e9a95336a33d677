from loom.models.transformer import ModelConfig, RopeScaling, Transformer, build_model
from loom.models.registry import MODELS, get_model_config

__all__ = ["ModelConfig", "RopeScaling", "Transformer", "build_model", "MODELS", "get_model_config"]
