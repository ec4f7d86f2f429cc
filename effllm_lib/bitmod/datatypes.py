"""Low-bit weight data types as exact value sets, and rounding onto them.

Every data type here is a finite, sorted set of representable values on an integer-like grid (the BitMoD
paper's convention: FP4 values are 2x the OCP E2M1 values, so the grid is 0, +-1, +-2, +-3, +-4, +-6, +-8, +-12
instead of 0, +-0.5, ..., +-6). A group of weights is stored as codes into the set plus a per-group scale.

BitMoD's observation: a sign-magnitude FP3/FP4 code wastes one of its 2^b codes on -0. BitMoD reuses that code
for one *special value*, giving four variants per bit width:

* ER+ / ER- ("extra resolution"): an extra value inside the range (FP3: +3 / -3; FP4: +10 / -10),
* EA+ / EA- ("extra asymmetry"): an extra value beyond the range on one side (FP3: +6 / -6; FP4: +16 / -16),

and picks per group of 128 weights whichever of the four gives the lowest quantization error (2-bit type id).

Baselines: INT3/INT4 symmetric (-3..3, -7..7), FP3 / FP4 (E2M1) without special values, ANT's FLINT4, and the
micro-scaling formats MX-FP4 / MX-FP3 (group 32, power-of-two E8M0 shared scale) and NVFP4 (group 16, FP8-E4M3
scale) whose element grids are the plain FP4 / FP3 sets below.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch


@dataclass(frozen=True)
class Grid:
    """A named data type: its sorted representable values (in grid units) and its storage bits."""

    name: str
    values: tuple[float, ...]
    bits: int

    def __post_init__(self):
        if list(self.values) != sorted(set(self.values)):
            raise ValueError(f"grid {self.name}: values must be sorted and distinct")
        if 0.0 not in self.values:
            raise ValueError(f"grid {self.name}: every weight grid here contains 0")
        if len(self.values) > 2 ** self.bits:
            raise ValueError(f"grid {self.name}: {len(self.values)} values do not fit {self.bits} bits")

    @property
    def max_abs(self) -> float:
        return max(abs(v) for v in self.values)

    def tensor(self, device=None, dtype=torch.float32) -> torch.Tensor:
        return torch.tensor(self.values, device=device, dtype=dtype)


def _sym(*magnitudes: float) -> tuple[float, ...]:
    """The sign-symmetric set {0, +-m for m in magnitudes}."""
    return tuple(sorted({0.0, *magnitudes, *(-m for m in magnitudes)}))


def _plus(base: tuple[float, ...], extra: float) -> tuple[float, ...]:
    return tuple(sorted({*base, extra}))


INT3 = Grid("int3", _sym(1, 2, 3), 3)
INT4 = Grid("int4", _sym(1, 2, 3, 4, 5, 6, 7), 4)
FP3 = Grid("fp3", _sym(1, 2, 4), 3)  # E2M0 x2: {0, 0.5, 1, 2} in OCP-like units
FP4 = Grid("fp4", _sym(1, 2, 3, 4, 6, 8, 12), 4)  # OCP E2M1 x2
FLINT4 = Grid("flint4", _sym(1, 2, 3, 4, 6, 8, 16), 4)  # ANT's float-int hybrid

# BitMoD's four special-value variants per bit width; the order is the tie-break order of the selection.
FP3_ER_POS = Grid("fp3_er_pos", _plus(FP3.values, 3.0), 3)
FP3_ER_NEG = Grid("fp3_er_neg", _plus(FP3.values, -3.0), 3)
FP3_EA_POS = Grid("fp3_ea_pos", _plus(FP3.values, 6.0), 3)
FP3_EA_NEG = Grid("fp3_ea_neg", _plus(FP3.values, -6.0), 3)
FP4_ER_POS = Grid("fp4_er_pos", _plus(FP4.values, 10.0), 4)
FP4_ER_NEG = Grid("fp4_er_neg", _plus(FP4.values, -10.0), 4)
FP4_EA_POS = Grid("fp4_ea_pos", _plus(FP4.values, 16.0), 4)
FP4_EA_NEG = Grid("fp4_ea_neg", _plus(FP4.values, -16.0), 4)

GRIDS: dict[str, Grid] = {g.name: g for g in (
    INT3, INT4, FP3, FP4, FLINT4,
    FP3_ER_POS, FP3_ER_NEG, FP3_EA_POS, FP3_EA_NEG,
    FP4_ER_POS, FP4_ER_NEG, FP4_EA_POS, FP4_EA_NEG,
)}


def grid(name: str) -> Grid:
    """The grid called ``name`` (e.g. ``"fp4_er_pos"``); a clear error lists the known names."""
    try:
        return GRIDS[name]
    except KeyError:
        raise ValueError(f"unknown data type {name!r}; known: {', '.join(GRIDS)}") from None


def int_grid(bits: int) -> Grid:
    return {3: INT3, 4: INT4}[_check_bits(bits)]


def fp_grid(bits: int) -> Grid:
    return {3: FP3, 4: FP4}[_check_bits(bits)]


def bitmod_grids(bits: int) -> tuple[Grid, Grid, Grid, Grid]:
    """BitMoD's candidates in the paper's order (ER+, ER-, EA+, EA-); ties go to the earlier one."""
    b = _check_bits(bits)
    return tuple(GRIDS[f"fp{b}_{kind}"] for kind in ("er_pos", "er_neg", "ea_pos", "ea_neg"))  # type: ignore


def _check_bits(bits: int) -> int:
    if bits not in (3, 4):
        raise ValueError(f"bits must be 3 or 4, got {bits!r}")
    return bits


# ------------------------------------------------------------------------------------------------ rounding
def round_to_values(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Each element of ``x`` replaced by the nearest entry of the sorted 1-D ``values``.

    Values beyond the ends saturate to the ends; an exact tie between two neighbours goes to the smaller
    one (the released quantizer's ``<= midpoint`` rule). Vectorized; see ``_half_step_table`` for the fast path.
    """
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError("values must be a 1-D tensor with at least two entries")
    table = _half_step_table(tuple(values.tolist()))
    if table is not None:
        lut, kmin, kmax = table
        # y <= m/2  <=>  ceil(2y) <= m for integer m, so ceil(2y) indexes a table of nearest values exactly
        k = (torch.ceil(x * 2).clamp_(kmin, kmax) - kmin).to(torch.int32)
        return lut.to(device=x.device, dtype=x.dtype).index_select(0, k.flatten()).view_as(x)
    values = values.to(device=x.device, dtype=x.dtype)
    mids = (values[1:] + values[:-1]) / 2
    # bucketize(right=False): index i with mids[i-1] < x <= mids[i], i.e. ties fall to the lower value.
    return values[torch.bucketize(x, mids)]


def round_to_grid(x: torch.Tensor, values: tuple[float, ...]) -> torch.Tensor:
    """``round_to_values(x, torch.tensor(values))`` for a value set given as a sorted tuple of floats: the same
    operations on the same numbers, but the look-up table (or the values and midpoints) live on ``x``'s device
    once per device and dtype, so a call makes no host-device copy and no synchronisation. On a GPU each of
    those costs a full wait for the queue (milliseconds on the device machine), and the quantizers round
    thousands of chunks."""
    lut, kmin, kmax, vals, mids = _grid_on(tuple(values), x.device, x.dtype)
    if lut is not None:
        k = (torch.ceil(x * 2).clamp_(kmin, kmax) - kmin).to(torch.int32)
        return lut.index_select(0, k.flatten()).view_as(x)
    return vals[torch.bucketize(x, mids)]


@lru_cache(maxsize=256)
def _grid_on(values: tuple[float, ...], device: torch.device, dtype: torch.dtype):
    """(table, kmin, kmax, None, None) of ``_half_step_table`` on ``device``, or (None, 0, 0, values, midpoints)
    there for a grid without one, computed as ``round_to_values`` computes them."""
    if len(values) < 2 or list(values) != sorted(values):
        raise ValueError("values must be a sorted tuple of at least two entries")
    vals = torch.tensor(values, device=device, dtype=dtype)
    table = _half_step_table(tuple(vals.tolist()))
    if table is not None:
        lut, kmin, kmax = table
        return lut.to(device=device, dtype=dtype), kmin, kmax, None, None
    return None, 0, 0, vals, (vals[1:] + vals[:-1]) / 2


def grid_tensor(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values, device=device, dtype=dtype)``, made once per device and dtype (do not modify it)."""
    return _tensor_on(tuple(values), device, dtype)


@lru_cache(maxsize=256)
def _tensor_on(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=dtype)


def grid_max_abs(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values).abs().max()`` on ``device`` (a 0-d tensor, cached): dividing by it, rather than by a
    Python float, keeps the GPU from multiplying by a rounded reciprocal instead."""
    return _max_abs_on(tuple(values), device, dtype)


@lru_cache(maxsize=256)
def _max_abs_on(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, device=device, dtype=dtype).abs().max()


@lru_cache(maxsize=64)
def _half_step_table(values: tuple[float, ...]):
    """(table, kmin, kmax) when every midpoint of ``values`` is a multiple of 1/2 (true of all the grids
    here): entry k - kmin is the nearest value for any y with ceil(2y) = k. A table look-up is several
    times faster on CPU than bucketize's binary search. None for other value sets."""
    twice_mids = [values[i] + values[i + 1] for i in range(len(values) - 1)]
    if any(m != int(m) for m in twice_mids) or twice_mids[-1] - twice_mids[0] > 4096:
        return None
    kmin, kmax = int(twice_mids[0]), int(twice_mids[-1]) + 1
    v = torch.tensor(values, dtype=torch.float64)
    ks = torch.arange(kmin, kmax + 1, dtype=torch.float64)
    lut = v[torch.bucketize(ks / 2, (v[1:] + v[:-1]) / 2)]
    return lut, kmin, kmax


def round_to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round positive scales to FP8 E4M3 (round-to-nearest-even, saturating at 448), back as float32."""
    return x.clamp(max=448.0).to(torch.float8_e4m3fn).to(torch.float32)
