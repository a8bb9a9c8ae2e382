"""Reasoning economics: what an answered question costs when answers are long chains of thought.

cost per attempt = prompt tokens x $ per input token (prefill unit) + output tokens x $ per output token,
the decode unit costed at the mean KV length per output token, prompt + output / 2 (an answer's cache
grows from the prompt to prompt + output, and a decode GPU holds answers at every stage, so the batch and
the KV read per step are those of that mean length: DeepSeek's "average KV length per output token").
cost per answered question = cost per attempt / accuracy: the expected spend per correct answer when a
wrong one is worth nothing (attempts are independent and the checker is free).

Simplifications: one mean output length stands for the whole length distribution; the prompt is prefilled
once per attempt with the deployment's prefix-cache hit rate.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nanoseek.config import ConfigError
from nanoseek.tokenomics.deployment import Deployment, FleetResult, fleet
from nanoseek.tokenomics.roofline import CostModel, normalize_attention
from nanoseek.tokenomics.sweeps import default_variants


@dataclass(frozen=True)
class ReasoningModel:
    name: str
    output_tokens: float  # mean answer length, chain of thought included
    accuracy: float  # fraction of questions answered correctly (pass@1)

    def validate(self) -> ReasoningModel:
        if not self.output_tokens >= 1:
            raise ConfigError(f"{self.name}: output_tokens must be >= 1, got {self.output_tokens}")
        if not 0 < self.accuracy <= 1:
            raise ConfigError(f"{self.name}: accuracy must be in (0, 1], got {self.accuracy}")
        return self

    @classmethod
    def parse(cls, text: str) -> ReasoningModel:
        """'NAME:TOKENS:ACCURACY', e.g. 'long-cot:8000:0.775'."""
        try:
            name, tokens, acc = text.split(":")
            parsed = cls(name, float(tokens), float(acc))
        except ValueError:
            raise ConfigError(f"--reasoning wants NAME:TOKENS:ACCURACY (e.g. long-cot:8000:0.775), got {text!r}") from None
        return parsed.validate()


@dataclass(frozen=True)
class AnswerCost:
    model: str
    attention: str
    output_tokens: float
    accuracy: float
    context: int  # mean KV length per output token
    decode_batch_per_gpu: int
    decode_tokens_per_s_per_gpu: float
    usd_per_mtok_input: float
    usd_per_mtok_output: float
    usd_per_attempt: float
    usd_per_answered: float


def answer_cost(model: CostModel, dep: Deployment, rm: ReasoningModel, attention: str | None = None) -> AnswerCost:
    rm.validate()
    ctx = max(1, round(dep.prompt_tokens + rm.output_tokens / 2))
    serving = dataclasses.replace(dep.serving, context=ctx, attention=attention or dep.serving.attention)
    f: FleetResult = fleet(model, dataclasses.replace(dep, serving=serving))
    attempt = (dep.prompt_tokens * f.usd_per_mtok_input + rm.output_tokens * f.usd_per_mtok_output) / 1e6
    return AnswerCost(rm.name, normalize_attention(model, serving.attention), rm.output_tokens, rm.accuracy, ctx, int(f.decode.tokens_per_gpu_per_step),
                      f.decode.tokens_per_s_per_gpu, f.usd_per_mtok_input, f.usd_per_mtok_output, attempt,
                      attempt / rm.accuracy)


def kv_comparison(model: CostModel, dep: Deployment, models: list[ReasoningModel],
                  variants: list[str] | None = None) -> dict[str, list[AnswerCost | None]]:
    """attention variant -> cost per answer for each reasoning model (None where not one sequence fits)."""
    out: dict[str, list[AnswerCost | None]] = {}
    for v in variants or default_variants(model):
        row = []
        for rm in models:
            try:
                row.append(answer_cost(model, dep, rm, v))
            except ConfigError as e:
                if "fit" not in str(e):
                    raise
                row.append(None)
        out[v] = row
    return out
