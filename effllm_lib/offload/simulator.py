"""The paper's pipelined two-model latency model (SplitReason section 4.4).

Both models prefill the prompt in parallel (time = the slower one). The decode of ``decode_tokens`` is cut into
chunks of ``chunk_tokens``; a chunk is written either by the small or by the big model while the other model
prefills that same chunk, so a chunk costs ``max(decode on the active model, prefill on the other)``. The big
model alone costs ``prefill / big prefill rate + decode / big decode rate``.

How many chunks are "big" follows the original (``official_results/simulation.py``): ``round(coverage * D)``
big tokens, floor-divided into whole chunks. With D = 16,384 and chunks of 256 that is ``floor(coverage * 64)``
except at rounding edges, which is why 1.35% offload (221 tokens) gives zero big chunks and the same speed-up
as 0%. The original places the big chunks at random; the total does not depend on where they are, so here the
count is used directly. A partial last chunk (only when D is not a multiple of the chunk) went to the big model
with probability 0.5 in the original; here that coin is an explicit ``rng``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import pandas as pd

# Throughputs in tokens/s measured by the authors on an A6000 (official_results/simulation.py at ac2036f).
PAPER_PREFILL = {"1.5B": 28868.4664, "7B": 7658.083194, "8B": 7456.973294, "14B": 3835.762802,
                 "32B": 2594.868088, "70B": 2237.695188}
PAPER_DECODE = {"1.5B": 141.0, "7B": 41.3, "8B": 40.3, "14B": 22.0, "32B": 16.0, "70B": 9.0}
PAPER_PREFILL_TOKENS = 2048
PAPER_DECODE_TOKENS = 16384
PAPER_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class Throughput:
    """Tokens per second of one model: prompt processing (prefill) and generation (decode)."""

    prefill: float
    decode: float

    def __post_init__(self):
        for name in ("prefill", "decode"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"Throughput.{name} must be a positive finite number of tokens/s, got {value!r}")


def paper_throughput(size: str) -> Throughput:
    if size not in PAPER_PREFILL:
        raise ValueError(f"unknown paper model {size!r}; expected one of {', '.join(PAPER_PREFILL)}")
    return Throughput(PAPER_PREFILL[size], PAPER_DECODE[size])


def _check_lengths(prefill_tokens: int, decode_tokens: int, chunk_tokens: int) -> None:
    for name, v in (("prefill_tokens", prefill_tokens), ("decode_tokens", decode_tokens),
                    ("chunk_tokens", chunk_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "prefill_tokens" else 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


def big_only_time(big: Throughput, prefill_tokens: int = PAPER_PREFILL_TOKENS,
                  decode_tokens: int = PAPER_DECODE_TOKENS) -> float:
    """Seconds for the big model alone: its prefill plus its decode."""
    _check_lengths(prefill_tokens, decode_tokens, 1)
    return prefill_tokens / big.prefill + decode_tokens / big.decode


def big_chunks(coverage: float, decode_tokens: int = PAPER_DECODE_TOKENS,
               chunk_tokens: int = PAPER_CHUNK_TOKENS) -> int:
    """Number of whole chunks the big model writes at this offload fraction (the original's rounding)."""
    if not isinstance(coverage, (int, float)) or not 0.0 <= coverage <= 1.0:
        raise ValueError(f"coverage is the fraction of decoded tokens from the big model, in [0, 1]; got {coverage!r}")
    big_tokens = int(round(coverage * decode_tokens))
    return min(big_tokens // chunk_tokens, decode_tokens // chunk_tokens)


def pipelined_time(small: Throughput, big: Throughput, coverage: float, *,
                   prefill_tokens: int = PAPER_PREFILL_TOKENS, decode_tokens: int = PAPER_DECODE_TOKENS,
                   chunk_tokens: int = PAPER_CHUNK_TOKENS, rng: random.Random | None = None) -> dict:
    """Seconds for the pipelined pair; returns the total and its parts (see the module docstring)."""
    _check_lengths(prefill_tokens, decode_tokens, chunk_tokens)
    prefill_s = max(prefill_tokens / big.prefill, prefill_tokens / small.prefill)
    n_chunks, leftover = divmod(decode_tokens, chunk_tokens)
    n_big = big_chunks(coverage, decode_tokens, chunk_tokens)
    big_chunk_s = max(chunk_tokens / big.decode, chunk_tokens / small.prefill)
    small_chunk_s = max(chunk_tokens / small.decode, chunk_tokens / big.prefill)
    decode_s = n_big * big_chunk_s + (n_chunks - n_big) * small_chunk_s
    big_tokens = n_big * chunk_tokens
    if leftover:
        # The original's coin flip for the partial chunk, only when some big tokens were left over.
        leftover_big = int(round(coverage * decode_tokens)) % chunk_tokens > 0
        partial_big = leftover_big and (rng or random.Random(0)).random() < 0.5
        if partial_big:
            decode_s += max(leftover / big.decode, leftover / small.prefill)
            big_tokens += leftover
        else:
            decode_s += max(leftover / small.decode, leftover / big.prefill)
    return {"total_s": prefill_s + decode_s, "prefill_s": prefill_s, "decode_s": decode_s,
            "big_chunks": n_big, "big_tokens": big_tokens, "coverage_simulated": big_tokens / decode_tokens}


def speedup(small: Throughput, big: Throughput, coverage: float, **lengths) -> float:
    """Big model alone / pipelined pair, at this fraction of decoded tokens from the big model."""
    base = big_only_time(big, lengths.get("prefill_tokens", PAPER_PREFILL_TOKENS),
                         lengths.get("decode_tokens", PAPER_DECODE_TOKENS))
    return base / pipelined_time(small, big, coverage, **lengths)["total_s"]


def speedup_table(pairs: dict[str, tuple[Throughput, Throughput]], coverages, **lengths) -> pd.DataFrame:
    """One row per (pair, coverage): simulated times and the speed-up over the big model alone."""
    rows = []
    for name, (small, big) in pairs.items():
        base = big_only_time(big, lengths.get("prefill_tokens", PAPER_PREFILL_TOKENS),
                             lengths.get("decode_tokens", PAPER_DECODE_TOKENS))
        for cov in coverages:
            sim = pipelined_time(small, big, float(cov), **lengths)
            rows.append({"pair": name, "coverage": float(cov), "big_chunks": sim["big_chunks"],
                         "pipelined_s": sim["total_s"], "big_only_s": base, "speedup": base / sim["total_s"]})
    return pd.DataFrame(rows)


def paper_pairs(bigs=("7B", "8B", "14B", "32B", "70B")) -> dict[str, tuple[Throughput, Throughput]]:
    """The paper's pairs: the 1.5B small model with each big model."""
    small = paper_throughput("1.5B")
    return {f"1.5B+{b}": (small, paper_throughput(b)) for b in bigs}


def time_prefill_decode(model, ids: list[int], decode_tokens: int) -> tuple[float, float]:
    """Seconds of one prefill over ``ids`` and of ``decode_tokens`` greedy single-token steps after it (batch 1,
    KV cache). Each step reads its token back to the host, as the controller does, and a CUDA device is
    synchronized around each phase so the clock sees the GPU's work."""
    import time

    import torch

    device = next(model.parameters()).device

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
        cache, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        sync()
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=torch.tensor([[tok]], device=device), past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            cache, tok = out.past_key_values, int(out.logits[0, -1].argmax())
        sync()
        return t_prefill, time.perf_counter() - t0


def measure_throughput(model, tokenizer, text: str, *, prefill_tokens: int = 512, decode_tokens: int = 32,
                       repeats: int = 1) -> Throughput:
    """Prefill and decode tokens/s of a Hugging Face causal LM on this machine (batch 1, KV cache, greedy).

    Prefill: one forward over the first ``prefill_tokens`` tokens of ``text``; decode: ``decode_tokens`` single-token
    steps after it. The best of ``repeats`` runs of each (the first run also pays one-time warm-up costs).
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < prefill_tokens:
        raise ValueError(f"text has {len(ids)} tokens, fewer than prefill_tokens={prefill_tokens}")
    if decode_tokens < 1 or repeats < 1:
        raise ValueError("decode_tokens and repeats must be >= 1")
    runs = [time_prefill_decode(model, ids[:prefill_tokens], decode_tokens) for _ in range(repeats)]
    best_p, best_d = min(r[0] for r in runs), min(r[1] for r in runs)
    return Throughput(prefill_tokens / best_p, decode_tokens / best_d)
