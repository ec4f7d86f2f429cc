"""A PQ inference kernel that can beat the dense layer on a CPU: 4-bit codes, int8 tables, in-register lookups.

Where PQ can win: encoding costs N_p * D multiply-adds per row whatever the layer, the lookups one table read per
subspace and output, so PQ pays off when N_p = 16 is small against C_out (pointwise 1x1 convs and linear layers
with wide outputs). ``PQLutKernel`` runs a calibrated ``PQLinear`` or 1x1 ``PQConv2d`` with N_p <= 16 as

1. encode: each sub-vector -> a 4-bit code, either the exact nearest prototype (what the PQ layer computes) or
   a MADDNESS-style hash tree (``fit_hash_tree``: 4 comparisons per sub-vector, no multiplies);
2. look up and sum int8 table entries in registers (``kernels/lut_kernels.cpp``): AVX-512 VBMI ``vpermb``
   over the tables of 4 subspaces at once plus a VNNI dot product to sum them; AVX2 ``vpshufb``; plain C++.
   The kernel is chosen at run time from what the CPU and OS support; asking for one they lack is an error,
   never an illegal instruction.

Tables are int8 with one scale per output channel, so the kernel's output differs from the float PQ layer by at
most N_s * scale_c / 2 per output (each entry is rounded to the nearest step).

The extension is built on first use by the library's shared loader (``effllm_lib._cpp``: the same compiler and
OpenMP flags as the other kernels), cached under a key of the source, flags, CPU and torch version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import _cpp
from .layers import PQConv2d, PQLinear, _PQBase

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("lut_kernels.cpp",)
KERNELS = ("portable", "avx2", "avx512_vbmi")  # slowest first
ROW_PAD = 64
N_CODES = 16  # 4-bit codes
SMALL_MAP = 64  # conv maps with fewer pixels are run as one block of B*H*W rows


def load_extension(verbose: bool = False):
    """The compiled LUT kernels (built the first time, then loaded from the cache)."""
    return _cpp.load_extension("pq_lut_kernels", SOURCES, kernel_dir=KERNEL_DIR, module_prefix="effllm_pq_lut",
                               what="the PQ LUT kernels", arch=None, include_kernel_dir=False, verbose=verbose)


def available_kernels() -> list[str]:
    """The lookup kernels this CPU and OS can run, slowest first."""
    return list(load_extension().available_kernels())


def resolve_kernel(kernel: str = "auto") -> str:
    if kernel != "auto" and kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected 'auto' or one of {KERNELS}")
    here = available_kernels()
    if kernel == "auto":
        return here[-1]
    if kernel not in here:
        raise RuntimeError(f"kernel {kernel!r} cannot run on this CPU/OS; available here: {here}")
    return kernel


def _raise(message: str) -> None:
    if message:
        raise RuntimeError(f"PQ LUT kernel: {message}")


# ------------------------------------------------------------------------------------------------ hash tree
@dataclass
class HashTree:
    """A 4-level balanced tree per subspace: level l compares feature ``dims[s, l]`` with
    ``thresholds[s, l, node]``; code = node index after 4 levels (node = 2 * node + (x > threshold)).
    ``prototypes`` [N_s, 16, L_s] are the training sub-vectors' means per leaf."""
    dims: torch.Tensor        # [N_s, 4] int32, absolute feature index
    thresholds: torch.Tensor  # [N_s, 4, 8] float32 (level l uses the first 2**l)
    prototypes: torch.Tensor  # [N_s, 16, L_s] float32

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """Codes [M, N_s] of rows [M, D] (vectorized torch; the C++ kernel computes the same)."""
        node = torch.zeros(rows.shape[0], self.dims.shape[0], dtype=torch.long)
        for level in range(4):
            x = rows[:, self.dims[:, level].long()]                                       # [M, N_s]
            thr = self.thresholds[:, level, :].t().gather(0, node)                        # [M, N_s]
            node = 2 * node + (x > thr).long()
        return node


def _best_split(values: torch.Tensor, vectors: torch.Tensor) -> tuple[float, float]:
    """(loss, threshold) of the best 2-way split of ``vectors`` [n, L] by one coordinate ``values`` [n]:
    the summed squared error of the two halves around their means (inf loss if no split exists)."""
    n = values.shape[0]
    if n < 2:
        return math.inf, math.inf
    order = values.argsort()
    v, xs = values[order].double(), vectors[order].double()
    c1, c2 = xs.cumsum(0), (xs * xs).cumsum(0)
    k = torch.arange(1, n, dtype=torch.float64)                      # left size for a split after k-1
    left = (c2[:-1] - c1[:-1] ** 2 / k[:, None]).sum(1)
    rc1, rc2 = c1[-1] - c1[:-1], c2[-1] - c2[:-1]
    right = (rc2 - rc1 ** 2 / (n - k)[:, None]).sum(1)
    loss = left + right
    loss[v[1:] <= v[:-1]] = math.inf                                  # a threshold must separate the halves
    i = int(loss.argmin())
    if not math.isfinite(float(loss[i])):
        return math.inf, math.inf
    return float(loss[i]), float((v[i] + v[i + 1]) / 2)


def fit_hash_tree(layer: _PQBase, rows: torch.Tensor) -> HashTree:
    """Learn a MADDNESS-style hash tree per subspace of ``layer`` from calibration rows [M, in_features].

    Per level, one feature of the subspace is chosen for all nodes (the one whose best per-node splits leave
    the smallest summed squared error), and each node splits at its best threshold on it. To use the tree's
    leaves as the layer's prototypes (so the tables match the codes): ``layer.set_prototypes(tree.prototypes)``
    (needs N_p = 16).
    """
    if not isinstance(layer, _PQBase):
        raise TypeError(f"fit_hash_tree needs a PQ layer, got {type(layer).__name__}")
    rows = rows.detach().float().reshape(-1, layer.in_features)
    if rows.shape[0] < N_CODES:
        raise ValueError(f"fit_hash_tree needs at least {N_CODES} rows, got {rows.shape[0]}")
    l_s, n_s, d = layer.config.subvec_len, layer.n_subspaces, layer.in_features
    dims = torch.zeros(n_s, 4, dtype=torch.int32)
    thresholds = torch.full((n_s, 4, 8), math.inf)
    protos = torch.zeros(n_s, N_CODES, l_s)
    for s in range(n_s):
        lo, hi = s * l_s, min(d, (s + 1) * l_s)
        sub = rows[:, lo:hi]
        node = torch.zeros(rows.shape[0], dtype=torch.long)
        for level in range(4):
            best = (math.inf, 0, None)
            for j in range(hi - lo):
                splits = [_best_split(sub[node == n, j], sub[node == n]) for n in range(2 ** level)]
                total = sum(loss for loss, _ in splits if math.isfinite(loss))
                if total < best[0] or best[2] is None:
                    best = (total, j, [t for _, t in splits])
            _, j, thr = best
            dims[s, level] = lo + j
            thresholds[s, level, :2 ** level] = torch.tensor(thr)
            node = 2 * node + (sub[:, j] > thresholds[s, level][node]).long()
        mean = sub.mean(0)
        for leaf in range(N_CODES):
            members = sub[node == leaf]
            protos[s, leaf, :hi - lo] = members.mean(0) if len(members) else mean
    return HashTree(dims, thresholds, protos)


# ------------------------------------------------------------------------------------------------- kernel
class PQLutKernel:
    """Frozen int8 tables of a calibrated PQLinear / 1x1 PQConv2d, run by the C++ LUT kernels (inference)."""

    def __init__(self, layer: _PQBase, *, tree: HashTree | None = None, kernel: str = "auto"):
        if not isinstance(layer, (PQLinear, PQConv2d)):
            raise TypeError(f"PQLutKernel needs a PQLinear or PQConv2d, got {type(layer).__name__}")
        if isinstance(layer, PQConv2d) and (layer.kernel_size != (1, 1) or layer.stride != (1, 1)
                                            or layer.pads != (0, 0, 0, 0)):
            raise ValueError("PQLutKernel runs pointwise convs only (1x1, stride 1, no padding); got kernel "
                             f"{layer.kernel_size}, stride {layer.stride}, pads {layer.pads}")
        if not bool(layer.calibrated):
            raise RuntimeError("PQLutKernel: the layer is not calibrated (no prototypes yet)")
        if layer.config.n_prototypes > N_CODES:
            raise ValueError(f"PQLutKernel uses 4-bit codes: N_p must be <= 16, got {layer.config.n_prototypes}")
        if layer.config.proto_bits:
            raise ValueError("PQLutKernel encodes with float prototypes; the layer has proto_bits="
                             f"{layer.config.proto_bits} (set_bits_(model, None, lut_bits) first)")
        self.layer, self.tree, self.kernel = layer, tree, resolve_kernel(kernel)
        self.n_sub, self.sub_len = layer.n_subspaces, layer.config.subvec_len
        self.s4 = 4 * math.ceil(self.n_sub / 4)
        n_p, c = layer.config.n_prototypes, layer.out_features
        with torch.no_grad():
            protos, lut = layer.quantized_tables()
            if tree is not None:
                if tree.dims.shape != (self.n_sub, 4) or tree.thresholds.shape != (self.n_sub, 4, 8):
                    raise ValueError(f"tree does not fit this layer (N_s {self.n_sub}): dims "
                                     f"{tuple(tree.dims.shape)}, thresholds {tuple(tree.thresholds.shape)}")
                if n_p != N_CODES:
                    raise ValueError("a hash tree has 16 leaves: the layer needs N_p = 16 "
                                     "(and tree.prototypes as its prototypes)")
            # padding prototypes never win: infinite |P|^2
            self.protos = F.pad(protos.float(), (0, 0, 0, N_CODES - n_p)).contiguous()
            self.proto_sq = F.pad((protos.float() ** 2).sum(-1), (0, N_CODES - n_p), value=math.inf).contiguous()
            self.scale = (lut.abs().amax(dim=(0, 1)) / 127).clamp(min=1e-12).float().contiguous()
            q = torch.round(lut / self.scale).clamp(-127, 127).to(torch.int8)     # [N_s, N_p, C]
            q = F.pad(q, (0, 0, 0, N_CODES - n_p, 0, self.s4 - self.n_sub))       # [S4, 16, C]
            self.q_tables = q                                                       # for references
            self.tables = (q.view(self.s4 // 4, 4, N_CODES, c).permute(0, 3, 1, 2)
                           .reshape(self.s4 // 4, c, 4 * N_CODES).contiguous())     # [G, C, 64]
            self.bias = None if layer.bias is None else layer.bias.detach().float().contiguous()
        self._empty = torch.empty(0)

    def codes(self, x_fm: torch.Tensor) -> torch.Tensor:
        """Codes [B, S4, Rp] (uint8) of feature-major input [B, D, R]."""
        b, _, r = x_fm.shape
        codes = torch.zeros(b, self.s4, ROW_PAD * math.ceil(r / ROW_PAD), dtype=torch.uint8)
        if self.tree is None:
            args = (self.protos, self.proto_sq, self._empty.int(), self._empty)
        else:
            args = (self._empty, self._empty, self.tree.dims.int().contiguous(),
                    self.tree.thresholds.float().contiguous())
        _raise(load_extension().encode(x_fm, codes, self.n_sub, self.sub_len,
                                       "exact" if self.tree is None else "tree", *args, self.kernel))
        return codes

    def _feature_major(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Input as [B, D, R] and whether each image is its own block of rows (else all rows are one block)."""
        layer = self.layer
        if x.dtype != torch.float32:
            raise TypeError(f"PQLutKernel takes float32 input, got {x.dtype}")
        if isinstance(layer, PQConv2d):
            if x.dim() != 4 or x.shape[1] != layer.in_channels:
                raise ValueError(f"expected input [B, {layer.in_channels}, H, W], got {tuple(x.shape)}")
            if x.shape[2] * x.shape[3] >= SMALL_MAP:
                return x.contiguous().view(x.shape[0], x.shape[1], -1), True
            # small maps: rows are padded to 64 per block, so pool the batch into one block
            return x.transpose(0, 1).reshape(1, x.shape[1], -1).contiguous(), False
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"expected input [..., {layer.in_features}], got {tuple(x.shape)}")
        return x.reshape(-1, layer.in_features).t().contiguous().unsqueeze(0), False

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's output; ``out`` (a contiguous float32 tensor of the output's shape) is written if given."""
        x_fm, per_image = self._feature_major(x)
        codes = self.codes(x_fm)
        c = self.layer.out_features
        conv = isinstance(self.layer, PQConv2d)
        shape = (x.shape[0], c, *x.shape[2:]) if conv else (*x.shape[:-1], c)
        if out is not None and (out.shape != shape or out.dtype != torch.float32 or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}, got "
                             f"{tuple(out.shape)} {out.dtype}")
        if per_image:  # NCHW: the kernel writes the output in place
            target = out if out is not None else torch.empty(shape)
            _raise(load_extension().lookup(codes, self.tables, self.scale, self.bias,
                                           target.view(x_fm.shape[0], c, -1), self.kernel))
            return target
        if not conv:  # rows x outputs: the kernel writes [M, C] directly (as [1, C, M] with row stride C)
            target = out if out is not None else torch.empty(shape)
            _raise(load_extension().lookup(codes, self.tables, self.scale, self.bias,
                                           target.view(-1, c).t().unsqueeze(0), self.kernel))
            return target
        out_t = torch.empty(1, c, x_fm.shape[2])
        _raise(load_extension().lookup(codes, self.tables, self.scale, self.bias, out_t, self.kernel))
        result = out_t.view(c, x.shape[0], *x.shape[2:]).transpose(0, 1)  # [C, B*H*W] -> [B, C, H, W]
        if out is not None:
            out.copy_(result)
            return out
        return result.contiguous()
