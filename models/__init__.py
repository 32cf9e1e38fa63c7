"""Dense and MoE decoders, and their exact parameter, FLOP and memory accounting."""

from models.accounting import FlopCounts, ParamCounts, count_params, estimate_memory_bytes, flops_per_token
from models.config import ModelConfig, MoEConfig
from models.model import ModelOutput, Transformer, build_model
from models.shapes import SHAPE_RULES, shape_for_target

__all__ = [
    "SHAPE_RULES", "FlopCounts", "ModelConfig", "ModelOutput", "MoEConfig", "ParamCounts", "Transformer",
    "build_model", "count_params", "estimate_memory_bytes", "flops_per_token", "shape_for_target",
]
