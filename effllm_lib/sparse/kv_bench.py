"""Decode speed with a sparse KV cache vs a dense one (the paper's 1.14x), against the byte bound.

    att = attention_latency([4096, 8192, 16384], [0.0, 0.5, 0.7], kernels=["avx512"])
    e2e = decode_latency_kv("llama3-8b", [4096, 16384], sparsity=0.5, kernels=["avx512"])

Attention only (``attention_latency``): one decode token (batch 1) attending over one layer's cache of the
Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128, bf16), dense by torch (``sdpa``:
``F.scaled_dot_product_attention`` with grouped KV heads; ``eager``: repeat, matmul, softmax, matmul, as
transformers' eager attention) and sparse by the op (``sparse_<kernel>``, K and V pruned to ``sparsity``). Each
candidate cycles through enough layers' caches to exceed the last-level cache three times over, so every call
reads its cache from DRAM as a real decode step (all layers once) does; candidates run interleaved, median of
the calls with p10/p90. Each row has the bytes the call must read (dense: K + V bf16; sparse: bitmaps + 2 bytes
per nonzero + strip offsets of K and V^T) and the time those bytes take at the machine's best read rate
(``bench.measure_read_bandwidth``, raised to the fastest bytes/time any candidate reached in the run, so no row
beats its bound): ``of_bound`` = bound time / measured time. ``speedup`` is over the best dense candidate of the
same context. The caches hold random values with a random unstructured mask of the given fraction: the time
depends on how many nonzeros there are and how they spread over the strips, not on which entries magnitude
pruning picks (the quality cost of magnitude pruning is measured on a real model in ``quality``).

End to end (``decode_latency_kv``): a random-weight bf16 model of an exact shape (``decode_bench.random_model``;
speed does not depend on the values) decodes batch 1 with its cache filled to ``context`` tokens of random K/V
(what a prefill leaves; the prefill itself is not timed), with transformers' stock ``DynamicCache`` and SDPA, with
``PreallocatedKVCache`` (dense, no per-step concatenation, grouped-query decode without ``repeat_kv``: the fair
dense baseline, since the stock cache rewrites its whole history at every step), and with ``SparseKVCache`` (the prompt part pruned by magnitude at ``sparsity``, packed, decoded by the op), in
alternating rounds. The ceiling is the bytes per token (weights + KV cache) dense over sparse: what the KV
compression alone can buy when a step is bound by streaming bytes. ``speedup`` is over the faster dense cache;
``speedup_vs_dynamic_cache`` over the stock one.
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
        base = min(med["sdpa"], med["eager"])
        base_name = "sdpa" if med["sdpa"] <= med["eager"] else "eager"
        for n, ts in times.items():
            bound = nbytes[n] / best_rate
            rows.append({"context": ctx, "impl": n, **meta[n], "query_heads": query_heads, "kv_heads": kv_heads,
                         "head_dim": head_dim, "layers_cycled": n_layers, "calls": len(ts),
                         "threads": torch.get_num_threads(), "ms": med[n] * 1e3, "p10_ms": _pct(ts, 0.1) * 1e3,
                         "p90_ms": _pct(ts, 0.9) * 1e3, "bytes": nbytes[n], "read_gbs": nbytes[n] / med[n] / 1e9,
                         "bound_ms": bound * 1e3, "of_bound": bound / med[n], "speedup": base / med[n],
                         "baseline": base_name, "bound_gbs": best_rate / 1e9,
                         "probe_gbs": bw["gbs"], "probe_source": bw["source"],
                         "byte_ratio": per_layer / nbytes[n]})
        log(pd.DataFrame(rows[-len(times):])[["context", "impl", "ms", "p10_ms", "p90_ms", "speedup", "byte_ratio",
                                              "of_bound"]].round(3).to_string(index=False))
        del caches, cands
    return pd.DataFrame(rows)


def _fill(cache, config, context: int, g) -> None:
    """What a prefill of ``context`` tokens leaves in ``cache``: random K/V of the model's shape per layer."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for i in range(text.num_hidden_layers):
        k, v = _random_layer(text.num_key_value_heads, context, hd, g)
        cache.update(k, v, i)


def _cache_kw(model) -> str:
    """The forward's name for the cache: ``cache`` in newer transformers, ``past_key_values`` before."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def decode_latency_kv(model_name: str, contexts, sparsity: float = 0.5, kernels: list[str] = ("auto",),
                      steps: int = 16, warmup: int = 2, rounds: int = 3, layers: int | None = None,
                      weight_sparsity: float | None = None, seed: int = 0,
                      log: Callable[[str], None] = print) -> pd.DataFrame:
    """One row per context x implementation ("dense_kv"; "sparse_kv_<kernel>"); see the module docstring.
    ``weight_sparsity``: also swap the decoder linears for the sparse kernels (``sparsify_``) at that mask
    sparsity, in both implementations (the paper's whole system); None keeps torch's dense bf16 linears."""
    from transformers import DynamicCache

    from .decode_bench import bytes_per_token, random_model
    from .sparsify import SparsifyConfig, sparsify_

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
        for kern in kernels:
            caches[f"sparse_kv_{kern}"] = SparseKVCache(model.config, SparseKVConfig(sparsity, kernel=kern))
        for c in caches.values():  # the same K/V in every cache
            _fill(c, model.config, ctx, torch.Generator().manual_seed(seed + ctx))
        log(f"context {ctx}: caches filled and packed in {time.perf_counter() - t0:.0f} s")
        tok = torch.randint(0, model.config.vocab_size, (1, 1), generator=g)
        times = {n: [] for n in caches}
        for r in range(rounds):
            order = list(caches)[r % len(caches):] + list(caches)[: r % len(caches)]
            for n in order:
                for i in range(warmup + steps):
                    t1 = time.perf_counter()
                    model(input_ids=tok, use_cache=True, **{kw: caches[n]})
                    if i >= warmup:
                        times[n].append(time.perf_counter() - t1)
        b = bytes_per_token(model, ctx)
        weights = b["linear_bytes"] + b["lm_head_bytes"]
        dense_bytes = weights + b["kv_bytes"]
        dense = [n for n in times if n.startswith("dense_kv")]
        base = min(statistics.median(times[n]) for n in dense)  # the best dense cache of this context
        stock = statistics.median(times["dense_kv"])
        for n, ts in times.items():
            kv = b["kv_bytes"] if n in dense else sum(layer.packed.nbytes() for layer in caches[n].layers
                                                         if getattr(layer, "packed", None) is not None)
            med = statistics.median(ts)
            ceiling = dense_bytes / (weights + kv)
            rows.append({"model": model_name, "context": ctx, "impl": n, "kv_sparsity": 0.0 if n in dense
                         else sparsity, "weight_sparsity": weight_sparsity or 0.0,
                         "weights": "sparse kernels" if weight_sparsity is not None else "torch bf16",
                         "layers": model.config.num_hidden_layers, "threads": torch.get_num_threads(),
                         "steps": steps, "rounds": rounds, "token_ms": med * 1e3,
                         "token_p10_ms": _pct(ts, 0.1) * 1e3, "token_p90_ms": _pct(ts, 0.9) * 1e3,
                         "weight_bytes": weights, "kv_bytes": kv, "bytes_per_token": weights + kv,
                         "read_gbs": (weights + kv) / med / 1e9, "speedup": base / med,
                         "speedup_vs_dynamic_cache": stock / med, "ceiling": ceiling,
                         "of_ceiling": (base / med) / ceiling if n not in dense else float("nan")})
        log(pd.DataFrame(rows[-len(times):])[["context", "impl", "token_ms", "token_p10_ms", "token_p90_ms",
                                              "speedup", "speedup_vs_dynamic_cache", "ceiling"]].round(3)
            .to_string(index=False))
        del caches
    return pd.DataFrame(rows)
