"""The per-group quantization search in C (``kernels/group_search.c``), called through ctypes.

``quantize._search`` in torch makes about twenty passes over the weights per candidate type and clipping
ratio; with the clipping search (10 ratios) BitMoD's 4 types cost 40 of them, which on a 2-core CPU takes
half an hour for a 135M model. The C version reads each group once per (type, ratio) from cache and is
used by ``quantize_tensor`` for the absmax-scaled types (INT, FP, FLINT, ANT, ER/EA, BitMoD, NF4) and
INT-asym on CPU float32 weights. It computes what the torch version computes, in float32, except that each
group's error is summed in double: two (type, ratio) pairs whose errors tie to within float32 rounding may
be chosen differently (tests/test_bitmod_group_search.py checks it against the torch search).

A plain C shared library (no torch headers: it builds in a second), cached under
``paths.cache_dir() / "bitmod_search" / <hash of source, flags, compiler>``. ``available()`` is False when
no C compiler works or EFFLLM_BITMOD_SEARCH=torch; callers then use the torch search.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from ..paths import cache_dir

SOURCE = Path(__file__).resolve().parent / "kernels" / "group_search.c"
# no -ffast-math and no FMA contraction: the arithmetic must round as torch's float32 ops do
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")

_lock = threading.Lock()
_lib = None
_error: str | None = None


def _build() -> ctypes.CDLL:
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc) on PATH")
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(CFLAGS).encode())
    h.update(cc.encode())
    target = cache_dir() / "bitmod_search" / f"group_search-{h.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp.so")
        res = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{res.stderr[-2000:]}")
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.absmax_search.argtypes = [p, i64, i32, i32, p, p, p, i32, p, i32, p, p, p]
    lib.absmax_search.restype = None
    lib.int_asym_search.argtypes = [p, i64, i32, i32, i32, p, i32, p, p]
    lib.int_asym_search.restype = None
    return lib


def load():
    """The ctypes library (built on first use); RuntimeError saying why when it can't be built."""
    global _lib, _error
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except (RuntimeError, OSError) as e:
                _error = str(e)
    if _lib is None:
        raise RuntimeError(f"the C group search is unavailable: {_error}")
    return _lib


def available() -> bool:
    if os.environ.get("EFFLLM_BITMOD_SEARCH", "").lower() == "torch":
        return False
    try:
        load()
        return True
    except RuntimeError:
        return False


def _check(x: torch.Tensor, weight: torch.Tensor | None):
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(f"x must be a [rows, groups, group_size] float32 CPU tensor, got "
                         f"{getattr(x, 'shape', type(x))} {getattr(x, 'dtype', '')}")
    x = x.contiguous()
    if weight is not None:
        weight = weight.to(torch.float32).expand(x.shape[1:]).contiguous()
    return x, weight


def absmax_search(x: torch.Tensor, value_sets: list[torch.Tensor], ratios, weight: torch.Tensor | None = None):
    """(dequantized [rows, groups, g], chosen candidate per group [rows, groups] int8) of the lowest-error
    (value set, ratio) per group, as ``quantize._search`` over ``quantize._absmax`` candidates.
    ``weight``: per input channel of a group ([groups, g] or broadcastable), weighting the squared error."""
    lib = load()
    x, weight = _check(x, weight)
    if not value_sets or len(value_sets) > 127:
        raise ValueError(f"need 1..127 value sets, got {len(value_sets)}")
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"clipping ratios must lie in (0, 1], got {ratios}")
    n_max = max(v.numel() for v in value_sets)
    vals = torch.zeros(len(value_sets), n_max, dtype=torch.float32)
    for c, v in enumerate(value_sets):
        v = v.detach().to(torch.float32).cpu()
        if v.ndim != 1 or v.numel() < 2 or not bool((v[1:] > v[:-1]).all()):
            raise ValueError("each value set must be a sorted 1-D tensor of at least two distinct values")
        vals[c, :v.numel()] = v
    n_vals = torch.tensor([v.numel() for v in value_sets], dtype=torch.int32)
    vmax = torch.stack([v.detach().to(torch.float32).cpu().abs().max() for v in value_sets])
    r = torch.tensor(ratios, dtype=torch.float32)
    out = torch.empty_like(x)
    ids = torch.empty(x.shape[:2], dtype=torch.int8)
    lib.absmax_search(x.data_ptr(), x.shape[0] * x.shape[1], x.shape[2], x.shape[1], vals.data_ptr(),
                      n_vals.data_ptr(), vmax.data_ptr(), len(value_sets), r.data_ptr(), len(ratios),
                      weight.data_ptr() if weight is not None else None, out.data_ptr(), ids.data_ptr())
    return out, ids


def int_asym_search(x: torch.Tensor, bits: int, ratios, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized [rows, groups, g]: per group the lowest-error ratio of ``quantize._int_asym``."""
    lib = load()
    x, weight = _check(x, weight)
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8, got {bits}")
    ratios = [float(r) for r in ratios]
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        raise ValueError(f"clipping ratios must lie in (0, 1], got {ratios}")
    r = torch.tensor(ratios, dtype=torch.float32)
    out = torch.empty_like(x)
    lib.int_asym_search(x.data_ptr(), x.shape[0] * x.shape[1], x.shape[2], x.shape[1], bits, r.data_ptr(),
                        len(ratios), weight.data_ptr() if weight is not None else None, out.data_ptr())
    return out
