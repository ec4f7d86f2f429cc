"""Timing helpers for the kernel benchmarks (benchmarks/sparse_kernels.py and the chapter notebook).

Latencies are medians over repeats; the candidates of one measurement run interleaved (each repeat runs
every candidate once, in a rotating order), so a noisy neighbour on a shared machine slows them alike.
Each candidate cycles through enough copies of its weight to exceed the last-level cache several times
over, so a layer's weights come from DRAM as in a real decoding step (one pass over all layers) rather
than from a cache warmed by the previous repeat.

The memory-bandwidth bound of a layer is the bytes its kernel must read divided by the fastest read rate
this machine was seen to reach. Part 1 used one probe (a scalar OR loop, one stream per thread), and on the
Xeon the dense AMX kernel then read up to 1.11x faster than the "bound" (and a dense read by torch came close):
a probe is only a lower estimate of what the memory system delivers. So ``measure_read_bandwidth`` takes the
best of (1) the plain read, (2) an AVX-512 read with four 64-byte streams per thread (``stream_read(t,
"avx512")``), and (3) the fastest dense matrix read measured: torch's bf16 GEMV and, where AMX runs, the
dense AMX kernel, each on a weight several times the last-level cache. ``layer_latency`` then raises that
rate to the fastest bytes / time of any implementation it measured in the same run (column
``bound_source``), so by construction no kernel exceeds its bound (``bound_fraction <= 1``). A plain read
also runs interleaved with each layer's candidates on as many bytes as the sparse weight (column
``bandwidth_gbs``), to show how much the machine was contended at that point.
"""

from __future__ import annotations

import itertools
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

from .format import pack_bf16, pack_dense_bf16_vnni
from .sparse_linear import dense_linear_amx, prune_magnitude, sparse_linear

# Llama-3-8B decoder-layer linears (out x in) and how many of each a layer has.
LLAMA3_8B_SHAPES = {"q_proj/o_proj": (4096, 4096, 2), "k_proj/v_proj": (1024, 4096, 2),
                    "gate_proj/up_proj": (14336, 4096, 2), "down_proj": (4096, 14336, 1)}


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB if unknown."""
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip()
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best or 32 * 2**20


def interleaved_times(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict:
    """Seconds of every call of each candidate, measured in rotating interleaved order."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_medians(candidates: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each candidate (see ``interleaved_times``)."""
    return {name: statistics.median(ts) for name, ts in interleaved_times(candidates, repeats, warmup).items()}


def _p10(ts: list[float]) -> float:
    return sorted(ts)[len(ts) // 10]


def _stream_read(ext, buf: torch.Tensor, method: str = "portable") -> int:
    """One parallel pass over ``buf``; returns the number of threads that took part."""
    err, _, width = ext.stream_read(buf, method)
    if err:
        raise RuntimeError(err)
    return width


def _median_rate(fn, nbytes: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def measure_read_bandwidth(nbytes: int | None = None, repeats: int = 9, dense: bool = True) -> dict:
    """The fastest read rate on torch's current thread count: the best of a plain read, a 4-stream AVX-512
    read (where AVX-512 runs) and, with ``dense``, torch's bf16 GEMV and the dense AMX kernel (where AMX
    runs) over a weight of ``nbytes`` (default: 4x the last-level cache, at least 512 MiB), each the median of
    ``repeats``. Returns ``{"bytes_per_s", "gbs", "source", "rates_gbs": {method: GB/s}, "threads", ...}``."""
    from ._build import load_extension
    from .cpu_features import cpu_features

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    llc = last_level_cache_bytes()
    nbytes = nbytes or max(4 * llc, 512 * 2**20)
    nbytes = nbytes // 4096 * 4096
    # bf16 1.0 in every half-word (no denormals for the GEMV reads); torch fills it on all threads, so the
    # pages spread over the memory controllers as a model's weights do
    buf = torch.full((nbytes // 8,), 0x3F803F803F803F80, dtype=torch.int64)
    ext = load_extension()
    width = _stream_read(ext, buf)
    rates = {"read_portable": _median_rate(lambda: _stream_read(ext, buf), nbytes, repeats)}
    f = cpu_features()
    if f.kernel_avx512:
        rates["read_avx512_4streams"] = _median_rate(lambda: _stream_read(ext, buf, "avx512"), nbytes, repeats)
    if dense:
        k = 4096
        w = buf.view(torch.bfloat16).view(-1, k)  # the same pages, read as a dense bf16 matrix
        x = torch.randn(1, k).bfloat16()
        rates["torch_bf16_gemv"] = _median_rate(lambda: F.linear(x, w), w.numel() * 2, repeats)
        if f.kernel_amx_bf16:
            tiles = w.view(-1, k // 32, 16, 32)  # any bf16 tiles: the speed does not depend on the values
            n = tiles.shape[0] * 16
            rates["dense_amx"] = _median_rate(lambda: dense_linear_amx(x, tiles, n), w.numel() * 2, repeats)
    source = max(rates, key=rates.get)
    bw = rates[source]
    return {"bytes_per_s": bw, "gbs": bw / 1e9, "source": source,
            "rates_gbs": {k: round(v / 1e9, 2) for k, v in rates.items()}, "threads": width,
            "buffer_mib": nbytes / 2**20, "llc_mib": llc / 2**20, "repeats": repeats,
            "method": (f"best of {', '.join(rates)} ({width} OpenMP threads, {nbytes / 2**20:.0f} MiB = "
                       f"{nbytes / llc:.1f}x the {llc / 2**20:.0f} MiB LLC, median of {repeats} passes each): "
                       f"{source}")}


def read_bandwidth(nbytes: int | None = None, repeats: int = 9) -> float:
    """Bytes per second this machine streams from DRAM into all of torch's threads (see
    ``measure_read_bandwidth``)."""
    return measure_read_bandwidth(nbytes, repeats)["bytes_per_s"]


def _cycler(items: list) -> Callable[[], object]:
    it = itertools.cycle(items)
    return lambda: next(it)


def layer_candidates(out_features: int, in_features: int, sparsity: float, tokens: int, kernels: list[str],
                     stream_bytes: int, seed: int = 0, dense_amx: bool = False):
    """Callables for torch bf16 F.linear and each sparse kernel on one pruned layer, and bytes per call."""
    g = torch.Generator().manual_seed(seed)
    w = prune_magnitude(torch.randn(out_features, in_features, generator=g).bfloat16(), sparsity)
    x = torch.randn(tokens, in_features, generator=g).bfloat16()
    packed = pack_bf16(w)
    dense_bytes = w.numel() * 2
    copies_dense = max(1, -(-stream_bytes // dense_bytes))
    copies_sparse = max(1, -(-stream_bytes // packed.nbytes()))
    dense_ws = [w] + [w.clone() for _ in range(copies_dense - 1)]
    next_dense = _cycler(dense_ws)
    sparse_ws = [packed] + [type(packed)(packed.bitmaps.clone(), packed.values.clone(), packed.strip_offsets.clone(),
                                         packed.out_features, packed.in_features) for _ in range(copies_sparse - 1)]
    next_sparse = _cycler(sparse_ws)
    out = torch.empty(tokens, out_features, dtype=torch.bfloat16)
    cands = {"torch_bf16": lambda: F.linear(x, next_dense())}
    nbytes = {"torch_bf16": dense_bytes}
    for k in kernels:
        cands[f"sparse_{k}"] = lambda k=k: sparse_linear(x, next_sparse(), kernel=k, out=out)
        nbytes[f"sparse_{k}"] = packed.nbytes()
    # the bandwidth meter, in the same loop: a plain read of as many bytes as the sparse weight
    from ._build import load_extension

    ext = load_extension()
    read_words = -(-packed.nbytes() // 8)
    next_buf = _cycler([torch.ones(read_words, dtype=torch.int64) for _ in range(copies_sparse)])
    cands["read_meter"] = lambda: _stream_read(ext, next_buf())
    nbytes["read_meter"] = read_words * 8
    if dense_amx:
        tiles = pack_dense_bf16_vnni(w)
        next_tiles = _cycler([tiles] + [tiles.clone() for _ in range(copies_dense - 1)])
        cands["dense_amx"] = lambda: dense_linear_amx(x, next_tiles(), out_features)
        nbytes["dense_amx"] = dense_bytes
    return cands, nbytes, packed


def layer_latency(shapes: dict, sparsities, kernels: list[str], tokens: int = 1, repeats: int = 15,
                  stream_bytes: int | None = None, bandwidth: float | None = None, dense_amx: bool = False,
                  progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """One row per (layer shape, sparsity, implementation): median latency, bytes, bound and speed-up.

    The bound is bytes / ``bandwidth`` (the standalone probe); ``bandwidth_gbs`` is the read meter that ran
    interleaved with this point (lower than the probe when the machine was busy)."""
    stream_bytes = stream_bytes or 3 * last_level_cache_bytes()
    bandwidth = bandwidth or read_bandwidth()
    rows = []
    for (layer, (n, k, count)), s in itertools.product(shapes.items(), sparsities):
        cands, nbytes, packed = layer_candidates(n, k, s, tokens, kernels, stream_bytes, dense_amx=dense_amx)
        times = interleaved_times(cands, repeats)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        bw_here = nbytes["read_meter"] / med.pop("read_meter")  # bandwidth measured alongside this point
        for impl, t in med.items():
            bound = nbytes[impl] / bandwidth
            rows.append({"layer": layer, "threads": torch.get_num_threads(), "out_features": n, "in_features": k, "count_per_decoder_layer": count,
                         "sparsity": s, "measured_sparsity": round(packed.sparsity, 4), "tokens": tokens,
                         "impl": impl, "latency_us": t * 1e6, "latency_p10_us": _p10(times[impl]) * 1e6, "weight_bytes": nbytes[impl],
                         "bound_us": bound * 1e6, "bound_fraction": bound / t,
                         "speedup_vs_torch": med["torch_bf16"] / t, "bandwidth_gbs": bw_here / 1e9,
                         "bandwidth_alone_gbs": bandwidth / 1e9})
        if progress:
            progress(f"{layer} s={s}: " + ", ".join(f"{i} {t * 1e6:.0f}us" for i, t in med.items()))
    df = pd.DataFrame(rows)
    # a bound no kernel exceeds: the probe, or the fastest read any implementation achieved in this run
    achieved = (df.weight_bytes / (df.latency_us * 1e-6)).max()
    if achieved > bandwidth:
        best = df.loc[(df.weight_bytes / df.latency_us).idxmax()]
        df["bound_source"] = f"{best.impl} at {best.layer} s={best.sparsity}"
        bandwidth = achieved
    else:
        df["bound_source"] = "probe"
    df["bound_bandwidth_gbs"] = bandwidth / 1e9
    df["bound_us"] = df.weight_bytes / bandwidth * 1e6
    df["bound_fraction"] = df.bound_us / df.latency_us
    if "sparse_avx512" in set(df.impl):  # AMX vs AVX-512 (and the rest) at every point
        keys = ["layer", "sparsity", "tokens"]
        avx = df[df.impl == "sparse_avx512"].set_index(keys).latency_us
        df["speedup_vs_avx512"] = [avx[tuple(r)] / t for r, t in zip(df[keys].values, df.latency_us)]
    return df


def thread_scaling(shapes: dict, sparsity: float, kernels: list[str], thread_counts, tokens: int = 1,
                   repeats: int = 15, stream_bytes: int | None = None, dense_amx: bool = False,
                   bandwidth_bytes: int | None = None, progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """``layer_latency`` at each thread count (capped at the cores), with the read bandwidth re-measured on
    that many threads, so the bound follows what that many cores can pull from DRAM."""
    before = torch.get_num_threads()
    frames = []
    try:
        for t in sorted({min(int(t), os.cpu_count() or 1) for t in thread_counts}):
            torch.set_num_threads(t)
            probe = measure_read_bandwidth(bandwidth_bytes, repeats=5)
            df = layer_latency(shapes, [sparsity], kernels, tokens=tokens, repeats=repeats,
                               stream_bytes=stream_bytes, bandwidth=probe["bytes_per_s"], dense_amx=dense_amx,
                               progress=progress)
            frames.append(df)
            if progress:
                progress(f"{t} threads: read bandwidth {probe['gbs']:.1f} GB/s")
    finally:
        torch.set_num_threads(before)
    return pd.concat(frames, ignore_index=True)


def decoder_layer_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per sparsity and implementation: the summed latency of a decoder layer's 7 linears and its ratios."""
    d = df.assign(total_us=df.latency_us * df.count_per_decoder_layer,
                  bound_total_us=df.bound_us * df.count_per_decoder_layer)
    g = d.groupby(["sparsity", "impl"], as_index=False)[["total_us", "bound_total_us"]].sum()
    torch_total = g[g.impl == "torch_bf16"].set_index("sparsity").total_us
    g["speedup_vs_torch"] = [torch_total[s] / t for s, t in zip(g.sparsity, g.total_us)]
    g["bound_fraction"] = g.bound_total_us / g.total_us
    return g


def decode_rate_ns_per_row(kernel: str, out_features: int = 256, in_features: int = 4096, sparsity: float = 0.5,
                           tokens: int = 1, repeats: int = 200, in_cpp: bool = True) -> float:
    """Nanoseconds per 32-weight tile row for one thread on a cache-resident layer: the compute floor.

    ``in_cpp``: timed by a loop inside the extension (``spmm_bf16_timed``: the kernel alone, no Python, no
    argument checks); else through the Python call (part 1's way, which adds the call's fixed cost)."""
    if in_cpp:
        from ._build import load_extension
        from .ops import KERNEL_CODES

        g = torch.Generator().manual_seed(0)
        packed = pack_bf16(prune_magnitude(torch.randn(out_features, in_features, generator=g), sparsity))
        x = torch.randn(tokens, packed.padded_shape[1], generator=g).bfloat16()
        err, sec = load_extension().spmm_bf16_timed(x, packed.bitmaps, packed.values, packed.strip_offsets,
                                                    out_features, KERNEL_CODES[kernel], repeats, True)
        if err:
            raise RuntimeError(err)
        return sec / packed.bitmaps.numel() * 1e9
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        w = prune_magnitude(torch.randn(out_features, in_features).bfloat16(), sparsity)
        packed = pack_bf16(w)
        x = torch.randn(tokens, in_features).bfloat16()
        out = torch.empty(tokens, out_features, dtype=torch.bfloat16)
        t = interleaved_medians({"k": lambda: sparse_linear(x, packed, kernel=kernel, out=out)}, repeats, 10)["k"]
    finally:
        torch.set_num_threads(before)
    rows = packed.bitmaps.numel()
    return t / rows * 1e9


def limits_breakdown(lat: pd.DataFrame, limits: pd.DataFrame, sparsity: float = 0.5) -> pd.DataFrame:
    """Per layer shape and sparse kernel at ``sparsity``: measured time next to torch's, the time one thread
    needs to decode the layer's tile rows (cache-resident rate x rows), that spread over the run's threads,
    and the bandwidth bound. ``decode_share`` = one-thread decode time / measured: near or above 1 means the
    kernel was as slow as one thread decoding, i.e. decode was not spread over the cores.

    ``threads`` is how many threads the kernels really ran on: results from before the ``-fopenmp`` build fix
    (their params lack ``bandwidth_method``) ran every kernel on one thread whatever torch's setting."""
    rows = []
    params = lat.attrs.get("provenance", {}).get("params", {})
    if "threads" in lat:
        threads = int(lat.threads.iloc[0])
    else:
        threads = int(params.get("threads", 1)) if "bandwidth_method" in params else 1
    for _, r in limits[limits.sparsity == sparsity].iterrows():
        d = lat[(lat.layer == r.layer) & (lat.sparsity == sparsity)].set_index("impl")
        n, k = int(d.out_features.iloc[0]), int(d.in_features.iloc[0])
        decode_1t = n * k / 32 * r.ns_per_tile_row_1thread / 1e3
        measured = d.latency_us[f"sparse_{r.kernel}"]
        rows.append({"layer": r.layer, "kernel": r.kernel, "measured_us": measured,
                     "torch_bf16_us": d.latency_us["torch_bf16"],
                     "speedup_vs_torch": d.latency_us["torch_bf16"] / measured,
                     "decode_1thread_us": decode_1t, "decode_all_threads_us": decode_1t / threads,
                     "bandwidth_bound_us": d.bound_us[f"sparse_{r.kernel}"], "threads": threads,
                     "decode_share": decode_1t / measured,
                     "torch_read_gbs": d.weight_bytes["torch_bf16"] / d.latency_us["torch_bf16"] / 1e3})
    return pd.DataFrame(rows)
