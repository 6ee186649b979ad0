"""Input-token estimates before the backend has seen the prompt.

Estimate = ceil(text bytes / bytes-per-token) + per-segment template overhead + tokens known exactly
(token-id prompts, a fixed guess per image). The bytes-per-token ratio is per model and learned from the
`usage.prompt_tokens` the backend reports (an exponentially weighted average over requests with enough
text to be informative).

Prior: 4.0 bytes per token, the usual figure for English text with ~100k–150k-entry BPE vocabularies
(Llama 3, Qwen, GPT-4 class tokenizers run 3.5–4.5 on English prose; code and non-Latin scripts are lower,
which the learned ratio picks up after a few requests). Overhead: 4 tokens per chat message (role markers
of the chat template) + 3 to prime the reply.

Under-estimating lets a request in that does not fit; over-estimating turns one away that would have. The
engine reconciles real usage at finish either way, so an estimate only has to be good, not exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .openai import OpenAIRequest

PRIOR_BYTES_PER_TOKEN = 4.0
MESSAGE_OVERHEAD = 4
REPLY_OVERHEAD = 3
# Learning: weight of one observation, the least text worth learning from, and a sanity clamp.
LEARN_WEIGHT = 0.1
LEARN_MIN_BYTES = 256
RATIO_BOUNDS = (1.0, 12.0)


@dataclass(slots=True)
class Estimate:
    tokens: int
    text_bytes: int  # what the ratio applied to (kept to learn from the reported usage)
    known_tokens: int  # overhead + exact tokens, not subject to the ratio


class TokenEstimator:
    def __init__(self, prior: float = PRIOR_BYTES_PER_TOKEN) -> None:
        self.prior = prior
        self._ratio: dict[str, float] = {}
        self._observations: dict[str, int] = {}

    def ratio(self, model: str) -> float:
        return self._ratio.get(model, self.prior)

    def estimate(self, req: OpenAIRequest) -> Estimate:
        known = req.extra_tokens
        if req.kind == "chat":
            known += MESSAGE_OVERHEAD * req.segments + REPLY_OVERHEAD
        if req.exact and req.text_bytes == 0:
            return Estimate(known, 0, known)
        text_tokens = math.ceil(req.text_bytes / self.ratio(req.model)) if req.text_bytes else 0
        return Estimate(max(1, text_tokens + known), req.text_bytes, known)

    def observe(self, model: str, estimate: Estimate, prompt_tokens: int | None) -> None:
        """Learn from the backend's real prompt_tokens for a request we estimated."""
        if prompt_tokens is None or estimate.text_bytes < LEARN_MIN_BYTES:
            return
        text_tokens = prompt_tokens - estimate.known_tokens
        if text_tokens <= 0:
            return
        seen = min(max(estimate.text_bytes / text_tokens, RATIO_BOUNDS[0]), RATIO_BOUNDS[1])
        n = self._observations.get(model, 0)
        # The first observations move the ratio faster (running mean), then it settles into an EWMA.
        weight = max(LEARN_WEIGHT, 1.0 / (n + 2))
        self._ratio[model] = (1 - weight) * self.ratio(model) + weight * seen
        self._observations[model] = n + 1
