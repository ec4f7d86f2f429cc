"""Decode speed with a sparse KV cache vs a dense one (the paper's 1.14x), against the byte bound.

    att = attention_latency([4096, 8192, 16384], [0.0, 0.5, 0.7], kernels=["avx512"])
    e2e = decode_latency_kv("llama3-8b", [4096, 16384], sparsity=0.5, kernels=["avx512"])

Attention only (``attention_latency``): one decode token (batch 1) attending over one layer's cache of the
Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128, bf16), dense by torch (``sdpa``:
``F.scaled_dot_product_attention`` with grouped KV heads; ``eager``: repeat, matmul, softmax, matmul, as
transformers' eager attention) and our kernel on the same unpruned cache in its dense layout (``dense_<kernel>``:
every value in the kernel's tile order, no bitmaps; the same loops with a plain load where the sparse path
expand-loads), and sparse by the op (``sparse_<kernel>_s<sparsity>``, K and V pruned to ``sparsity``; at 0 the
bitmap format of the unpruned cache, 6 % more bytes than dense). Each candidate cycles through enough layers' caches
to exceed the last-level cache three times over, so every call reads its cache from DRAM as a real decode step (all
layers once) does; candidates run interleaved, median of the calls with p10/p90. Each row has the bytes the call
must read (dense: K + V bf16; sparse: bitmaps + 2 bytes per nonzero + strip offsets of K and V^T) and the time those
bytes take at the machine's best read rate (``bench.measure_read_bandwidth``, raised to the fastest bytes/time any
candidate reached in the run, so no row beats its bound): ``of_bound`` = bound time / measured time. ``speedup`` is
over the fastest candidate (by median) of the same context that keeps every entry (sdpa, eager, ``dense_<kernel>``,
``sparse_<kernel>_s0``; named in ``baseline``), the median over the ``repeats`` passes of the per-pass paired ratio
(baseline's median call over the candidate's, both timed interleaved in the same pass): torch's SDPA reaches only
about a quarter of the read bound on a CPU, so a ratio over it would measure our kernel's quality as much as the
sparsity. ``speedup_vs_sdpa`` keeps the ratio over SDPA. ``speedup_lo`` / ``speedup_hi``: the median-of-pass ratios'
order-statistic interval over the ``repeats`` passes (see ``median_interval``; its coverage in
``speedup_ci_level``). The caches hold random values with a random unstructured mask of the given fraction: the time
depends on how many nonzeros there are and how they spread over the strips, not on which entries magnitude pruning
picks (the quality cost of magnitude pruning is measured on a real model in ``quality``).

End to end (``decode_latency_kv``): a random-weight bf16 model of an exact shape (``decode_bench.random_model``;
speed does not depend on the values) decodes batch 1 with its cache filled to ``context`` tokens of random K/V (what
a prefill leaves; the prefill itself is not timed), with transformers' stock ``DynamicCache`` and SDPA
(``dense_kv``), with ``PreallocatedKVCache`` (``dense_kv_prealloc``: no per-step concatenation, grouped-query SDPA
without ``repeat_kv``), with ``SparseKVCache`` at sparsity 0 in the dense layout (``dense_kv_ownkernel_<kernel>``:
our kernel on the unpruned cache, no bitmaps, the same tail and call path as the sparse cache) and with
``SparseKVCache`` (``sparse_kv_<kernel>``: the prompt part pruned by magnitude at ``sparsity``, packed, decoded by
the op). All caches hold the same K/V (generated once per layer). Candidates run in ``rounds`` short rounds
(``warmup`` + ``steps`` tokens each), the order rotated every round. ``speedup`` is over the fastest dense candidate
(by its median over all rounds; named in ``baseline``), so kernel quality cancels out and what is left is the
sparsity: the median over rounds of the per-round paired ratio (below); ``speedup_vs_sdpa`` is over the faster SDPA
cache (the earlier baseline), ``speedup_vs_dynamic_cache`` over the stock one (ratios of medians). ``speedup_lo`` /
``speedup_hi``: per round, the baseline's median step over the candidate's (a paired ratio: both ran within seconds
of each other), and the distribution-free interval for the median of those round ratios from their order statistics
(``median_interval``: the narrowest symmetric pair with coverage >= 95 %, min/max when there are too few rounds for
that; the coverage is in ``speedup_ci_level``). Bootstrapping a median over 8-10 rounds under-covers; the
order-statistic interval needs no assumption beyond independent rounds. The ceiling is the bytes per token (weights
+ KV cache) dense over the candidate's: what the KV compression alone can buy when a step is bound by streaming
bytes.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from .bench import _cycler, interleaved_times, last_level_cache_bytes, measure_read_bandwidth
from .kv_cache import (PackedKV, PreallocatedKVCache, SparseKVCache, SparseKVConfig, enable_sparse_kv_, pack_kv, resolve_kv_kernel,
                       sparse_kv_attention)

LLAMA3_8B_ATTENTION = {"query_heads": 32, "kv_heads": 8, "head_dim": 128}


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def median_interval(xs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, coverage): the distribution-free confidence interval for the median of the distribution ``xs``
    are drawn from, by order statistics (the sign test): the narrowest symmetric pair x_(k), x_(n+1-k) whose
    coverage 1 - 2 P(Binomial(n, 1/2) < k) is at least ``level``; with too few values for that, min and max with
    their (lower) coverage. No assumption on the shape of the distribution, only independent draws."""
    if not xs:
        raise ValueError("median_interval needs at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s, n = sorted(xs), len(xs)

    def coverage(k: int) -> float:  # 1 - 2 P(B < k), B ~ Binomial(n, 1/2)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return s[k - 1], s[n - k], coverage(k)


def dense_kv_bytes(kv_heads: int, seq_len: int, head_dim: int) -> int:
    """K + V in bf16."""
    return 2 * kv_heads * seq_len * head_dim * 2


def _random_layer(kv_heads, seq_len, head_dim, g) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.randn(1, kv_heads, seq_len, head_dim, generator=g).bfloat16()
    v = torch.randn(1, kv_heads, seq_len, head_dim, generator=g).bfloat16()
    return k, v


def _masked(t: torch.Tensor, sparsity: float, g) -> torch.Tensor:
    if sparsity == 0:
        return t
    return t.masked_fill(torch.rand(t.shape, generator=g) < sparsity, 0)


def _cycle_calls(fns: list[Callable]) -> Callable:
    """A callable that calls the next of ``fns`` each time (round robin)."""
    nxt = _cycler(fns)
    return lambda: nxt()()


def eager_attention(q, k, v, scale):
    """transformers' eager attention at one token: repeat the KV heads, matmul, float32 softmax, matmul."""
    g = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    w = torch.softmax((q @ kr.transpose(2, 3)) * scale, -1, dtype=torch.float32).to(q.dtype)
    return w @ vr


@torch.no_grad()
def attention_latency(contexts, sparsities, kernels: list[str], query_heads: int = 32, kv_heads: int = 8,
                      head_dim: int = 128, repeats: int = 5, min_layers: int = 2, bandwidth: dict | None = None,
                      seed: int = 0, log: Callable[[str], None] = print) -> pd.DataFrame:
    """One row per context x implementation (dense ones once per context, sparse ones per sparsity); see the
    module docstring. ``repeats`` passes over all layers' caches per candidate."""
    kernels = [resolve_kv_kernel(k) for k in kernels]
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsities must be in [0, 1), got {s}")
    bw = bandwidth or measure_read_bandwidth()
    llc = last_level_cache_bytes()
    scale = head_dim ** -0.5
    rows = []
    g = torch.Generator().manual_seed(seed)
    for ctx in contexts:
        t0 = time.perf_counter()
        per_layer = dense_kv_bytes(kv_heads, ctx, head_dim)
        n_layers = max(min_layers, math.ceil(3 * llc / per_layer))
        caches = [_random_layer(kv_heads, ctx, head_dim, g) for _ in range(n_layers)]
        q = torch.randn(1, query_heads, 1, head_dim, generator=g).bfloat16()
        q2 = q[0, :, 0, :].contiguous()
        cands: dict[str, Callable] = {}
        nbytes: dict[str, int] = {}
        meta: dict[str, dict] = {}
        cands["sdpa"] = _cycle_calls([lambda k=k, v=v: F.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                                  enable_gqa=True)
                                 for k, v in caches])
        cands["eager"] = _cycle_calls([lambda k=k, v=v: eager_attention(q, k, v, scale) for k, v in caches])
        for name in ("sdpa", "eager"):
            nbytes[name], meta[name] = per_layer, {"sparsity": 0.0, "kernel": "torch"}
        dense_packs = [pack_kv(k[0], v[0], layout="dense") for k, v in caches]  # our kernel, nothing pruned
        for kern in kernels:
            name = f"dense_{kern}"
            cands[name] = _cycle_calls([lambda p=p, kern=kern: sparse_kv_attention(q2, p, scale=scale, kernel=kern)
                                        for p in dense_packs])
            nbytes[name] = dense_packs[0].nbytes()
            meta[name] = {"sparsity": 0.0, "kernel": kern, "k_sparsity": 0.0, "v_sparsity": 0.0}
        for s in sparsities:
            packs: list[PackedKV] = [pack_kv(_masked(k[0], s, g), _masked(v[0], s, g)) for k, v in caches]
            for kern in kernels:
                name = f"sparse_{kern}_s{s:g}"
                cands[name] = _cycle_calls([lambda p=p, kern=kern: sparse_kv_attention(q2, p, scale=scale, kernel=kern)
                                       for p in packs])
                nbytes[name] = statistics.mean(p.nbytes() for p in packs)
                ks, vs = zip(*(p.sparsity for p in packs))
                meta[name] = {"sparsity": s, "kernel": kern, "k_sparsity": statistics.mean(ks),
                              "v_sparsity": statistics.mean(vs)}
        log(f"context {ctx}: {n_layers} layers of caches ({n_layers * per_layer / 2**20:.0f} MiB dense), "
            f"built in {time.perf_counter() - t0:.0f} s; timing {len(cands)} candidates")
        times = interleaved_times(cands, repeats * n_layers, warmup=n_layers)
        med = {n: statistics.median(ts) for n, ts in times.items()}
        best_rate = max(bw["bytes_per_s"], max(nbytes[n] / med[n] for n in med))
        # the baseline: the fastest candidate that keeps every entry (torch's or our kernel on the dense cache)
        base_name = min((n for n in med if meta[n]["sparsity"] == 0), key=med.get)
        # one pass = every cycled layer once per candidate: per-pass medians give paired ratios
        passes = {n: [statistics.median(ts[i * n_layers:(i + 1) * n_layers]) for i in range(repeats)]
                  for n, ts in times.items()}
        for n, ts in times.items():
            ratios = [b / c for b, c in zip(passes[base_name], passes[n])]
            lo, hi, level = median_interval(ratios)
            bound = nbytes[n] / best_rate
            rows.append({"context": ctx, "impl": n, **meta[n], "query_heads": query_heads, "kv_heads": kv_heads,
                         "head_dim": head_dim, "layers_cycled": n_layers, "calls": len(ts),
                         "threads": torch.get_num_threads(), "ms": med[n] * 1e3, "p10_ms": _pct(ts, 0.1) * 1e3,
                         "p90_ms": _pct(ts, 0.9) * 1e3, "bytes": nbytes[n], "read_gbs": nbytes[n] / med[n] / 1e9,
                         "bound_ms": bound * 1e3, "of_bound": bound / med[n], "speedup": statistics.median(ratios),
                         "speedup_lo": lo, "speedup_hi": hi, "speedup_ci_level": level,
                         "speedup_vs_sdpa": med["sdpa"] / med[n], "baseline": base_name, "bound_gbs": best_rate / 1e9,
                         "probe_gbs": bw["gbs"], "probe_source": bw["source"],
                         "byte_ratio": per_layer / nbytes[n]})
        log(pd.DataFrame(rows[-len(times):])[["context", "impl", "ms", "p10_ms", "p90_ms", "speedup", "speedup_lo",
                                              "speedup_hi", "speedup_vs_sdpa", "byte_ratio", "of_bound"]]
            .round(3).to_string(index=False))
        del caches, cands, dense_packs
    return pd.DataFrame(rows)


def _fill(caches, config, context: int, g) -> None:
    """What a prefill of ``context`` tokens leaves in each of ``caches``: the same random K/V of the model's shape
    per layer (generated once, handed to every cache; each cache copies or packs what it keeps)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for i in range(text.num_hidden_layers):
        k, v = _random_layer(text.num_key_value_heads, context, hd, g)
        for cache in caches:
            cache.update(k, v, i)


def _cache_kw(model) -> str:
    """The forward's name for the cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _is_dense(name: str) -> bool:
    return name.startswith("dense_kv")


@torch.no_grad()
def decode_latency_kv(model_name: str, contexts, sparsity: float = 0.5, kernels: list[str] = ("auto",),
                      steps: int = 4, warmup: int = 1, rounds: int = 10, layers: int | None = None,
                      weight_sparsity: float | None = None, seed: int = 0,
                      log: Callable[[str], None] = print) -> pd.DataFrame:
    """One row per context x implementation ("dense_kv", "dense_kv_prealloc", "dense_kv_ownkernel_<kernel>",
    "sparse_kv_<kernel>"); see the module docstring. ``weight_sparsity``: also swap the decoder linears for the
    sparse kernels (``sparsify_``) at that mask sparsity, in all implementations (the paper's whole system); None
    keeps torch's dense bf16 linears."""
    from transformers import DynamicCache

    from .decode_bench import bytes_per_token, random_model
    from .sparsify import SparsifyConfig, sparsify_

    if rounds < 2 or steps < 1 or warmup < 0:
        raise ValueError(f"need rounds >= 2 (the interval is over rounds), steps >= 1, warmup >= 0; got "
                         f"rounds={rounds}, steps={steps}, warmup={warmup}")
    kernels = [resolve_kv_kernel(k) for k in kernels]
    model = random_model(model_name, weight_sparsity or 0.0, layers, seed=seed)
    if weight_sparsity is not None:
        sparsify_(model, SparsifyConfig(sparsity=weight_sparsity, method="none"))
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, max(contexts) + 1024)
    enable_sparse_kv_(model)  # dense caches take the SDPA path through it (one attribute check per layer)
    kw = _cache_kw(model)
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for ctx in contexts:
        t0 = time.perf_counter()
        caches = {"dense_kv": DynamicCache(config=model.config), "dense_kv_prealloc": PreallocatedKVCache(model.config)}
        for kern in kernels:  # our kernel on the unpruned cache: the dense baseline of the same code
            caches[f"dense_kv_ownkernel_{kern}"] = SparseKVCache(model.config, SparseKVConfig(0.0, kernel=kern,
                                                                                              layout="dense"))
        for kern in kernels:
            caches[f"sparse_kv_{kern}"] = SparseKVCache(model.config, SparseKVConfig(sparsity, kernel=kern))
        _fill(list(caches.values()), model.config, ctx, torch.Generator().manual_seed(seed + ctx))
        log(f"context {ctx}: {len(caches)} caches filled and packed in {time.perf_counter() - t0:.0f} s")
        tok = torch.randint(0, model.config.vocab_size, (1, 1), generator=g)
        per_round = {n: [[] for _ in range(rounds)] for n in caches}
        names = list(caches)
        for r in range(rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                for i in range(warmup + steps):
                    t1 = time.perf_counter()
                    model(input_ids=tok, use_cache=True, **{kw: caches[n]})
                    if i >= warmup:
                        per_round[n][r].append(time.perf_counter() - t1)
        times = {n: [t for rt in per_round[n] for t in rt] for n in names}
        med = {n: statistics.median(ts) for n, ts in times.items()}
        round_med = {n: [statistics.median(rt) for rt in per_round[n]] for n in names}
        b = bytes_per_token(model, ctx)
        weights = b["linear_bytes"] + b["lm_head_bytes"]
        dense_bytes = weights + b["kv_bytes"]
        base_name = min((n for n in names if _is_dense(n)), key=med.get)  # the fastest dense candidate
        sdpa = min(med["dense_kv"], med["dense_kv_prealloc"])
        for n in names:
            packed = [layer.packed for layer in caches[n].layers if getattr(layer, "packed", None) is not None]
            kv = sum(p.nbytes() for p in packed) if packed else b["kv_bytes"]
            ratios = [bb / c for bb, c in zip(round_med[base_name], round_med[n])]
            lo, hi, level = median_interval(ratios)
            speedup, ceiling = statistics.median(ratios), dense_bytes / (weights + kv)
            rows.append({"model": model_name, "context": ctx, "impl": n, "kv_sparsity": 0.0 if _is_dense(n)
                         else sparsity, "weight_sparsity": weight_sparsity or 0.0,
                         "weights": "sparse kernels" if weight_sparsity is not None else "torch bf16",
                         "layers": model.config.num_hidden_layers, "threads": torch.get_num_threads(),
                         "steps": steps, "warmup": warmup, "rounds": rounds, "token_ms": med[n] * 1e3,
                         "token_p10_ms": _pct(times[n], 0.1) * 1e3, "token_p90_ms": _pct(times[n], 0.9) * 1e3,
                         "weight_bytes": weights, "kv_bytes": kv, "bytes_per_token": weights + kv,
                         "read_gbs": (weights + kv) / med[n] / 1e9, "baseline": base_name, "speedup": speedup,
                         "speedup_lo": lo, "speedup_hi": hi, "speedup_ci_level": level,
                         "speedup_vs_sdpa": sdpa / med[n], "speedup_vs_dynamic_cache": med["dense_kv"] / med[n],
                         "ceiling": ceiling,
                         "of_ceiling": speedup / ceiling if not _is_dense(n) else float("nan")})
        log(pd.DataFrame(rows[-len(names):])[["context", "impl", "token_ms", "token_p10_ms", "token_p90_ms",
                                              "speedup", "speedup_lo", "speedup_hi", "speedup_vs_sdpa",
                                              "speedup_vs_dynamic_cache", "ceiling"]].round(3).to_string(index=False))
        del caches
    return pd.DataFrame(rows)


def kv_speedup_claim(df: pd.DataFrame) -> tuple[dict | None, str]:
    """(scorecard row or None, why) for claim kv_sparsity_speedup from a ``decode_latency_kv`` frame: the fastest
    sparse candidate at the longest context over the fastest dense one, with its interval. None when the
    interval lies wholly above the byte ceiling: the sparse cache then beats what its bytes allow, so the ratio
    measures something besides the sparsity (a slower dense path, noise) and is not a measurement of the claim."""
    longest = df[(df.context == df.context.max()) & ~df.impl.map(_is_dense)]
    if longest.empty:
        raise ValueError("kv_speedup_claim: no sparse_kv_* row in the frame")
    r = longest.loc[longest.speedup.idxmax()]
    desc = (f"{r.impl} over {r.baseline} (the fastest of the stock DynamicCache, the preallocated cache with "
            f"grouped-query SDPA and our kernel on the unpruned cache): {r.speedup:.3f}x, "
            f"{100 * r.speedup_ci_level:.0f}% interval {r.speedup_lo:.3f}-{r.speedup_hi:.3f} (order statistics of "
            f"{int(r.rounds)} per-round paired ratios); byte ceiling {r.ceiling:.3f}x")
    if r.speedup_lo > r.ceiling:
        return None, (f"not a claim measurement: {desc}, below the interval's lower end: the sparse run beats its "
                      "bytes, so its dense baseline is slower than the bytes explain")
    return ({"claim_id": "kv_sparsity_speedup", "ours": float(r.speedup), "ours_lo": float(r.speedup_lo),
             "ours_hi": float(r.speedup_hi), "status": "measured",
             "reason": (f"{r.model} shape, random weights, batch 1, {int(r.threads)} threads, {int(r.context)} "
                        f"cached tokens, K and V pruned {r.kv_sparsity:.0%} by magnitude, weights {r.weights}; "
                        f"{desc}, measured/ceiling {r.of_ceiling:.2f}; vs SDPA {r.speedup_vs_sdpa:.3f}x, vs the "
                        f"stock DynamicCache {r.speedup_vs_dynamic_cache:.3f}x")}, desc)
