"""Inference: batched latent-cache generation, sampling, MTP speculative decoding."""
from nanoseek.engine.engine import Engine, Generation, SpecStats
from nanoseek.engine.sampling import SamplingParams

__all__ = ["Engine", "Generation", "SamplingParams", "SpecStats"]
