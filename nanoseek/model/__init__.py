"""The DeepSeek-V3 model: norm + rope (YaRN), MLA, DeepSeekMoE, MTP, simulated FP8 matmuls."""
from nanoseek.model.transformer import IGNORE, LossParts, Transformer

__all__ = ["Transformer", "LossParts", "IGNORE"]
