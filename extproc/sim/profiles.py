"""Backend profiles: engine limits plus the step-time model of one simulated vLLM replica.

Step-time model (seconds, for one engine step):

    t = max(min_step_s, base_s + prefill_token_s * P + decode_token_s * D) + resident_token_s * R

P: prompt (prefill) tokens computed in the step, D: decode tokens in the step (one per decoding
sequence), R: tokens resident in the KV cache of running sequences after the step's allocation.
With base_s=0, prefill_token_s = decode_token_s = 67 µs, min_step_s = 10 ms this is exactly the rule of
thumb in DESIGN.md §5; the shipped profiles use fitted values instead (see README.md, "Calibration").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_tokens: int
    max_model_len: int
    block_size: int = 16
    kv_bytes_per_token: int = 131072
    base_s: float = 0.0
    prefill_token_s: float = 67e-6
    decode_token_s: float = 67e-6
    resident_token_s: float = 50e-9
    min_step_s: float = 0.010

    def __post_init__(self) -> None:
        for f in ("max_num_seqs", "max_num_batched_tokens", "kv_cache_tokens", "max_model_len", "block_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"profile {self.name}: {f} must be >= 1")
        for f in ("base_s", "prefill_token_s", "decode_token_s", "resident_token_s", "min_step_s"):
            if getattr(self, f) < 0:
                raise ValueError(f"profile {self.name}: {f} must be >= 0")
        # A request that fits max_model_len must fit in an otherwise empty cache, or it could never run.
        if self.max_model_len > self.kv_blocks * self.block_size:
            raise ValueError(f"profile {self.name}: max_model_len exceeds the KV cache")

    @property
    def kv_blocks(self) -> int:
        return self.kv_cache_tokens // self.block_size

    def step_time(self, prefill_tokens: int, decode_tokens: int, resident_tokens: int) -> float:
        compute = self.base_s + self.prefill_token_s * prefill_tokens + self.decode_token_s * decode_tokens
        return max(self.min_step_s, compute) + self.resident_token_s * resident_tokens

    def replace(self, **changes: Any) -> Profile:
        """A copy with some fields changed; None values are ignored (handy for optional CLI flags)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PROFILES: dict[str, Profile] = {
    # DGX-Spark-like box from the paper: 16 slots, ~240 output tok/s at 16 x (64 in, 64 out).
    # Decode is memory-bound: 8B BF16 weights over ~273 GB/s is ~60 ms per step whatever the batch.
    "paper-spark": Profile(
        name="paper-spark",
        max_num_seqs=16,
        max_num_batched_tokens=2048,
        kv_cache_tokens=131072,
        max_model_len=8192,
        min_step_s=0.062,
        prefill_token_s=270e-6,
        decode_token_s=270e-6,
        resident_token_s=480e-9,
    ),
    # Llama-3-8B BF16 on one H100 80GB. Roofline form: a step costs the larger of the weight-read
    # floor (7.8 ms) and its token compute, plus attention over resident KV (50 µs per 1,000 tokens,
    # DESIGN.md's 40-65). A prefill token costs more than a decode token (32 vs 12 µs: attention over
    # its chunk); decode batches stay under the floor up to ~650 sequences.
    # max_num_seqs 256 / max_num_batched_tokens 2048 (vLLM's long-standing defaults) fit the
    # reference numbers; vLLM v1's H100 defaults (1024 / 8192) make prefill stalls too long.
    # KV: 128 KiB/token, 400k tokens (~49 GiB). Fitted by bench/calibrate.py; see README.md.
    "h100-llama3-8b": Profile(
        name="h100-llama3-8b",
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        kv_cache_tokens=400_000,
        max_model_len=8192,
        min_step_s=0.0078,
        prefill_token_s=32e-6,
        decode_token_s=12e-6,
        resident_token_s=50e-9,
    ),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None


def load_profile(path: str | Path, base: Profile | None = None) -> Profile:
    """Read a profile from YAML: a mapping of Profile fields, optionally `extends: <builtin name>`."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a profile must be a YAML mapping")
    extends = data.pop("extends", None)
    if extends is not None:
        base = get_profile(extends)
    known = {f.name for f in dataclasses.fields(Profile)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown profile fields {sorted(unknown)}")
    if base is None:
        data.setdefault("name", Path(path).stem)
        return Profile(**data)
    return dataclasses.replace(base, **data)
