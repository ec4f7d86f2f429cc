"""GPTQ (Frantar et al., ICLR 2023) on any of the study's data types: ``BitMoDConfig(calibration="gptq")``.

Columns (input channels) are quantized left to right; each column's rounding error is spread over the columns
not yet quantized through the inverse of the layer's input Gram matrix H = E[x x^T] (from calibration text), so
the layer OUTPUT error is minimised rather than the weight error. As in the paper: H is damped by 1% of its
mean diagonal, its inverse is taken through a Cholesky factorisation (the upper factor of H^-1 gives every
step's row of the inverse), and updates are applied lazily in blocks of 128 columns.

A group's data type and scale are chosen as round to nearest chooses them (``quantize.py``: per group the
lowest-MSE candidate type and, with ``clip``, clipping ratio) from the group's weights as they are when GPTQ
reaches the group's first column (error feedback from earlier groups included), as GPTQ's reference code does
with ``groupsize``. Every column of the group is then rounded onto that row's value set. OliVe's outlier-victim
pairs are decided when GPTQ reaches the pair's first column (from both columns' current values); the second
column is then rounded in the role (normal, outlier, victim = 0) its pair gave it.

With H = identity there is no feedback and the result equals round to nearest exactly (tested), which checks that
the per-column rounding reproduces every data type.
"""

from __future__ import annotations

import math

import torch

from . import datatypes as dt
from . import quantize as Q

BLOCK = 128  # GPTQ's lazy-batch width
DAMP = 0.01  # fraction of mean(diag(H)) added to the diagonal


def _select(x: torch.Tensor, candidates, ratios) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the group ``x`` [rows, g]: index of the chosen candidate and of the chosen ratio, with the
    same order and tie-break as ``quantize._search`` (strictly lower error wins)."""
    best_err = best_c = best_r = None
    for i, cand in enumerate(candidates):
        for j, r in enumerate(ratios):
            err = (cand(x, r, None) - x).pow(2).mean(-1)
            if best_err is None:
                best_err = err
                best_c = torch.zeros(err.shape, dtype=torch.long, device=x.device)
                best_r = torch.zeros(err.shape, dtype=torch.long, device=x.device)
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_c = torch.where(better, torch.full_like(best_c, i), best_c)
            best_r = torch.where(better, torch.full_like(best_r, j), best_r)
    return best_c, best_r


class _GroupRounder:
    """Rounds single columns of one group onto the value sets chosen for its rows (one scale per row, and for
    selection methods one grid per row)."""

    def __init__(self, x: torch.Tensor, dtype: str, bits: int, ratios, tensor_amax: float):
        self.dtype, self.bits = dtype, bits
        candidates, own = Q._candidates(dtype, bits, tensor_amax)
        ratios = list(own or ratios)
        cand, rat = _select(x, candidates, ratios)
        self.ids = cand.to(torch.int8) if dtype in Q._SELECTION else None
        # every constant below comes from a per-device cache: a fresh tensor per group would be a host-to-device
        # copy, and a .item() a device-to-host one, each a full GPU sync (milliseconds on the device machine)
        ratio = dt.grid_tensor(tuple(ratios), x.device, x.dtype)[rat].unsqueeze(-1)  # [rows, 1]
        amax = x.abs().amax(-1, keepdim=True)
        # the scales below repeat quantize.py's arithmetic operation for operation (so H = I gives RTN exactly)
        if dtype == "int_asym":
            qmax = 2 ** bits - 1
            lo, hi = x.amin(-1, keepdim=True) * ratio, x.amax(-1, keepdim=True) * ratio
            self.scale = (hi - lo) / qmax
            self.safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
            self.zero = torch.round(-lo / self.safe).clamp(0, qmax)
            self.const = lo  # a constant group is stored exactly by its zero point
        elif dtype == "olive":
            qmax = 2 ** (bits - 1) - 1
            self.scale = amax * ratio / qmax
            self.safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
            self.normal = dt.int_grid(bits).values
            self.mags = Q.OLIVE_OUTLIER_MAGNITUDES[bits]
            self.threshold = (qmax + self.mags[0]) / 2
            self.role = None  # the pair's roles for the second column: 0 normal, 1 outlier, 2 victim
        elif dtype == "mxfp":
            values = dt.grid_tensor(dt.fp_grid(bits).values, x.device, x.dtype)
            a = amax * ratio
            emax = math.floor(math.log2(dt.fp_grid(bits).max_abs))
            exponent = torch.floor(torch.log2(torch.where(a > 0, a, torch.ones_like(a)))) - emax
            self.scale = torch.where(a > 0, torch.exp2(exponent), torch.zeros_like(a))
            self.grids = [values]
        elif dtype == "nvfp":
            values = dt.grid_tensor(dt.fp_grid(bits).values, x.device, x.dtype)
            vmax = dt.grid_max_abs(dt.fp_grid(bits).values, x.device, x.dtype)
            tensor_scale = tensor_amax / (float(dt.fp_grid(bits).max_abs) * 448.0) if tensor_amax > 0 else 1.0
            self.scale = dt.round_to_e4m3(amax * ratio / vmax / tensor_scale) * tensor_scale
            self.grids = [values]
        elif dtype == "iq4_nl":
            self.d = Q._iq4_nl_scale(x)
        else:  # absmax types: one or more grids
            self.grids = [dt.grid_tensor(v, x.device, x.dtype) for v in Q._absmax_value_tuples(dtype, bits)]
            vmax = torch.stack([v.abs().max() for v in self.grids])[cand].unsqueeze(-1)
            self.scale = amax / vmax * ratio
            self.cand = cand
        if hasattr(self, "scale") and dtype not in ("int_asym", "olive"):
            self.safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        if dtype not in ("int_asym", "olive", "iq4_nl"):
            # per row: its grid's values and midpoints, so a column rounds with one compare and one gather.
            # y > mid counts exactly what round_to_values' "<= midpoint goes down" rule does (same mids, same y).
            k = max(len(v) for v in self.grids)
            vals = torch.stack([torch.cat([v, v[-1:].expand(k - len(v))]) for v in self.grids])
            mids = torch.stack([torch.cat([(v[1:] + v[:-1]) / 2, torch.full((k - len(v),), math.inf, dtype=v.dtype,
                                                                           device=v.device)]) for v in self.grids])
            which = self.cand if len(self.grids) > 1 else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
            self.row_vals, self.row_mids = vals[which], mids[which]
            self.scale1, self.safe1 = self.scale.squeeze(-1), self.safe.squeeze(-1)

    def round(self, c: torch.Tensor, k: int, nxt: torch.Tensor | None = None) -> torch.Tensor:
        """Column ``k`` of the group (values ``c`` [rows]) rounded; ``nxt`` is column k+1's current values
        (OliVe decides a pair at its first column)."""
        d = self.dtype
        if d == "int_asym":
            s = self.safe.squeeze(-1)
            qmax = 2 ** self.bits - 1
            zero, scale = self.zero.squeeze(-1), self.scale.squeeze(-1)
            q = (torch.round(c / s) + zero).clamp(0, qmax)
            return torch.where(scale > 0, (q - zero) * scale, self.const.squeeze(-1))
        if d == "iq4_nl":
            return Q._iq4_nl_round(c.unsqueeze(-1), self.d).squeeze(-1)
        if d == "olive":
            return self._olive(c, k, nxt)
        idx = ((c / self.safe1).unsqueeze(1) > self.row_mids).sum(1, keepdim=True)
        return self.row_vals.gather(1, idx).squeeze(1) * self.scale1

    def _olive(self, c: torch.Tensor, k: int, nxt: torch.Tensor | None) -> torch.Tensor:
        s, scale = self.safe.squeeze(-1), self.scale.squeeze(-1)
        y = c / s
        if k % 2 == 0:  # the pair's first column: decide both roles from the current values (quantize._olive)
            y1 = nxt / s
            m0, m1 = y.abs(), y1.abs()
            out0, out1 = m0 > self.threshold, m1 > self.threshold
            keep0 = out0 & (~out1 | (m0 >= m1))
            keep1 = out1 & ~keep0
            role0 = torch.where(keep0, 1, torch.where(keep1, 2, 0))
            self.role = torch.where(keep1, 1, torch.where(keep0, 2, 0))
            role = role0
        else:
            role = self.role
        q_out = torch.sign(y) * dt.round_to_grid(y.abs(), self.mags)
        q_normal = dt.round_to_grid(y, self.normal)
        q = torch.where(role == 1, q_out, torch.where(role == 2, torch.zeros_like(y), q_normal))
        return q * scale


def inverse_hessian_factor(h: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, the dead-column mask). Input channels that
    never fire (H_ii = 0) get H_ii = 1 and their weights are zeroed, as in GPTQ."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    try:
        lower = torch.linalg.cholesky(h)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise RuntimeError(f"GPTQ: the damped Hessian is not positive definite ({e}); raise the damping") from e
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True), dead


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, bits: int = 4, dtype: str = "bitmod",
                  group_size: int = 128, *, clip: bool = False, damp: float = DAMP,
                  block: int = BLOCK) -> Q.TensorQuant:
    """GPTQ-quantize a weight ``[rows, in_features]`` given its input Gram matrix ``hessian``
    ([in_features, in_features], E[x x^T] or any positive multiple). Returns a ``quantize.TensorQuant``."""
    cfg = Q.BitMoDConfig(bits=bits, group_size=group_size, dtype=dtype, clip=clip)
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not torch.is_floating_point(w):
        raise ValueError(f"expected a 2-D floating-point weight, got {getattr(w, 'shape', type(w))}")
    rows, cols = w.shape
    if not isinstance(hessian, torch.Tensor) or hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be a ({cols}, {cols}) tensor, got {getattr(hessian, 'shape', None)}")
    if not (torch.isfinite(w).all() and torch.isfinite(hessian).all()):
        raise ValueError("weight and hessian must be finite")
    if block < 1 or not 0 <= damp:
        raise ValueError(f"block must be >= 1 and damp >= 0, got {block}, {damp}")
    g = cfg.effective_group_size
    if dtype in ("q4_k", "q3_k"):
        raise ValueError(f"GPTQ is not implemented for {dtype}: its scales are fitted per super-block of 256 jointly "
                         "(llama.cpp's k-quants have their own importance-matrix path)")
    if dtype == "olive" and (g % 2 or cols % 2):
        raise ValueError(f"OliVe pairs adjacent weights: group size and in_features must be even, got {g}, {cols}")
    if dtype == "olive" and block % 2:
        raise ValueError("OliVe pairs adjacent columns: block must be even")
    ratios = Q.CLIP_RATIOS if clip else (1.0,)
    tensor_amax = float(w.abs().max())  # NVFP's per-tensor scale, from the weight as given (as RTN)
    u, dead = inverse_hessian_factor(hessian.to(w.device), damp)
    work = torch.promote_types(w.dtype, torch.float32)  # bf16/fp16 in float32; float64 stays float64
    u = u.to(work)
    # transposed, so that a column is a contiguous vector and the updates are in-place rank-1 / matmul adds
    Wt = w.to(work).t().contiguous()
    Wt[dead] = 0
    out = torch.zeros_like(Wt)
    n_groups = rows * math.ceil(cols / g)
    ids = torch.zeros(rows, math.ceil(cols / g), dtype=torch.int8, device=w.device) if dtype in Q._SELECTION else None
    rounder = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err1 = torch.zeros(i2 - i1, rows, dtype=work, device=w.device)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group: its type and scale from its current weights
                gend = min(col + g, cols)
                cur = Wt[col:min(gend, i2)]
                if gend > i2:  # past this block: add the updates of this block's columns, still pending there
                    cur = torch.cat([cur, Wt[i2:gend] - u[i1:col, i2:gend].t() @ err1[:i]])
                rounder = _GroupRounder(cur.t().contiguous(), dtype, bits, ratios, tensor_amax)
                if ids is not None:
                    ids[:, col // g] = rounder.ids
            k = col % g
            c = Wt[col]
            nxt = None
            if dtype == "olive" and k % 2 == 0:
                nxt = Wt[col + 1] if col + 1 < i2 else Wt[col + 1] - u[i1:col, col + 1] @ err1[:i]
            q = rounder.round(c, k, nxt)
            out[col] = q
            e = (c - q) / u[col, col]
            err1[i] = e
            if col + 1 < i2:
                Wt[col + 1:i2].addr_(u[col, col + 1:i2], e, alpha=-1)
        if i2 < cols:
            Wt[i2:].addmm_(u[i1:i2, i2:].t(), err1, alpha=-1)
    return Q.TensorQuant(out.t().contiguous().to(w.dtype), ids, n_groups)
