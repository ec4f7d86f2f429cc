"""``kernel="auto"``: which bf16 kernel is fastest on this machine, measured once and cached.

Part 1 picked AVX-512 below 16 tokens from a rule of thumb (the paper's early numbers); the Xeon's own data
then showed AMX ahead at batch 1 at all 20 layer x sparsity points. So the choice is measured: at first use,
every kernel that can run here (plus ``dense``: decompress once, then torch's dense GEMM, for many tokens)
multiplies a 50 %-sparse 2048 x 2048 weight by 1, 4, 16, 64 and 256 tokens, interleaved, median of a few
repeats, on torch's current thread count. Each call's token count falls in one of those classes (``token_class``)
and runs the class's winner. The answer is cached in ``cache_dir()/sparse_kernels/<build key>/`` per thread
count; the build key already hashes the CPU's flags, torch and the kernel sources, so another machine or an
edited kernel calibrates again. The weight's shape is not part of the key: on the Xeon the ranking was the
same for all four Llama-3-8B shapes at batch 1 (q/o, k/v, gate/up, down; results/sparamx/layer_latency_xeon),
and the calibration weight is cache-resident, so it ranks the kernels by their decode rate, which is what
differs between them (they read the same bytes). ``EFFLLM_SPARSE_AUTO=portable|avx512|amx|dense`` skips the
measurement and uses that kernel for every class (where it can run).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time

import torch

from ._build import build_key, load_extension
from ..paths import cache_dir

TOKEN_CLASSES = (1, 4, 16, 64, 256)  # representative token counts; a call uses the nearest class below
CAL_SHAPE = (2048, 2048)
CAL_SPARSITY = 0.5
DENSE_MIN_TOKENS = 16  # decompress-then-GEMM is a candidate from here on (never at decode)

_lock = threading.Lock()
_forced: dict[tuple, str] = {}
_table: dict[tuple, dict[int, str]] = {}  # (threads, dense allowed) -> {token class: kernel}


def token_class(tokens: int) -> int:
    """The calibration class a call with ``tokens`` rows falls in (the largest class <= tokens)."""
    best = TOKEN_CLASSES[0]
    for c in TOKEN_CLASSES:
        if tokens >= c:
            best = c
    return best


def _cache_file(threads: int):
    return cache_dir() / "sparse_kernels" / build_key() / f"auto_threads{threads}.json"


def _candidates(tokens: int) -> list[str]:
    from .cpu_features import available_kernels

    here = available_kernels("bf16")
    kernels = [k for k in here if k != "portable"] or ["portable"]
    return kernels + (["dense"] if tokens >= DENSE_MIN_TOKENS else [])


def measure(repeats: int = 7, seed: int = 0) -> dict:
    """Median seconds of every candidate per token class: ``{class: {kernel: seconds}}``."""
    from .format import pack_bf16
    from .ops import KERNEL_CODES, sparse_ops
    from .pruning import prune_magnitude

    ops = sparse_ops()
    g = torch.Generator().manual_seed(seed)
    n, k = CAL_SHAPE
    w = prune_magnitude(torch.randn(n, k, generator=g), CAL_SPARSITY).bfloat16()
    p = pack_bf16(w)
    args = (p.bitmaps, p.values, p.strip_offsets)
    out: dict[int, dict[str, float]] = {}
    for tokens in TOKEN_CLASSES:
        x = torch.randn(tokens, k, generator=g).bfloat16()
        fns = {}
        for name in _candidates(tokens):
            if name == "dense":
                fns[name] = lambda x=x: torch.nn.functional.linear(x, ops.densify_bf16(*args, n, k))
            else:
                fns[name] = lambda x=x, c=KERNEL_CODES[name]: ops.spmm_bf16(x, *args, n, None, c)
        reps = repeats if tokens <= 16 else max(3, repeats // 2)
        times = {name: [] for name in fns}
        for f in fns.values():
            f()
        for r in range(reps):
            for name in list(fns)[r % len(fns):] + list(fns)[: r % len(fns)]:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
        out[tokens] = {name: statistics.median(ts) for name, ts in times.items()}
    return out


def calibrate(force: bool = False) -> dict:
    """The cached calibration of this machine at torch's thread count (measured now if absent or ``force``):
    ``{"threads", "choice": {class: kernel}, "seconds": {class: {kernel: s}}, "shape", "sparsity"}``."""
    threads = torch.get_num_threads()
    path = _cache_file(threads)
    if not force and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a torn file: measure again
    load_extension()
    seconds = measure()
    record = {"threads": threads, "shape": list(CAL_SHAPE), "sparsity": CAL_SPARSITY,
              "choice": {str(c): min(s, key=s.get) for c, s in seconds.items()},
              "choice_sparse": {str(c): min((k for k in s if k != "dense"), key=s.get) for c, s in seconds.items()},
              "seconds": {str(c): s for c, s in seconds.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return record


def auto_kernel(tokens: int, allow_dense: bool = True) -> str:
    """The kernel ``kernel="auto"`` runs for a bf16 call with ``tokens`` rows on this machine ("dense" =
    decompress, then torch's GEMM; only where ``allow_dense``)."""
    forced = os.environ.get("EFFLLM_SPARSE_AUTO")
    if forced:
        key = (forced, allow_dense)
        if key not in _forced:  # checked once (a kernel the CPU lacks is a clear error), then a dict lookup
            from .cpu_features import resolve_kernel

            if forced == "dense":
                _forced[key] = "dense" if allow_dense else resolve_kernel("auto_rule", "bf16")
            else:
                _forced[key] = resolve_kernel(forced, "bf16")
        return _forced[key]
    key = (torch.get_num_threads(), allow_dense)
    table = _table.get(key)
    if table is None:
        with _lock:
            table = _table.get(key)
            if table is None:
                rec = calibrate()
                table = {int(c): k for c, k in rec["choice" if allow_dense else "choice_sparse"].items()}
                _table[key] = table
    return table[token_class(tokens)]
