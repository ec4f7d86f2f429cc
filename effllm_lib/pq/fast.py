"""A vectorized CPU inference path for a calibrated PQ conv: encode with one batched matmul, then gather
and accumulate with ``embedding_bag`` (one fused kernel: no [M, N_s, Cout] intermediate).

Encoding needs argmin_p |x - P_p|^2 = argmin_p (|P_p|^2 - 2 x.P_p): |x|^2 is dropped and |P|^2 precomputed,
so the search is a single ``baddbmm`` per batch plus an argmin.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import PQConv2d, pq_layers, proto_grid


class FastPQConv2d:
    """Frozen inference tables of a calibrated ``PQConv2d`` (float; low-bit tables are used as rounded)."""

    def __init__(self, layer: PQConv2d):
        if not isinstance(layer, PQConv2d):
            raise TypeError(f"FastPQConv2d needs a PQConv2d, got {type(layer).__name__}")
        if not bool(layer.calibrated):
            raise RuntimeError("FastPQConv2d: the layer is not calibrated")
        with torch.no_grad():
            protos, lut = layer.quantized_tables()
            self.grid = None
            if layer.config.proto_bits:  # search on the integer codes, exactly like the layer (and hardware)
                self.grid = proto_grid(layer.prototypes * layer.proto_mask, layer.config.proto_bits)
                protos = torch.round(protos / self.grid[0])
            self.protos_t = protos.transpose(1, 2).contiguous()             # [N_s, L_s, N_p]
            self.proto_sq = (protos * protos).sum(-1).unsqueeze(1).contiguous()  # [N_s, 1, N_p]
            self.lut = lut.reshape(-1, lut.shape[-1]).contiguous()           # [N_s*N_p, Cout]
        self.layer = layer
        self.offsets = torch.arange(layer.n_subspaces) * layer.config.n_prototypes

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        b, _, h, w = x.shape
        ho, wo = layer.out_size(h, w)
        rows = layer.rows(x)
        if layer.pad:
            rows = F.pad(rows, (0, layer.pad))
        if self.grid is not None:
            scale, zero = self.grid
            hi = 2**layer.config.proto_bits - 1
            rows = torch.clamp(torch.round(rows / scale) + zero, 0, hi) - zero
        sub = rows.view(rows.shape[0], layer.n_subspaces, -1).transpose(0, 1)  # [N_s, M, L_s] (a view)
        idx = torch.baddbmm(self.proto_sq, sub, self.protos_t, alpha=-2).argmin(-1)  # [N_s, M]
        out = F.embedding_bag(idx.t() + self.offsets, self.lut, mode="sum")
        if layer.bias is not None:
            out += layer.bias
        return out.view(b, ho, wo, -1).permute(0, 3, 1, 2)


class _FastConvModule(nn.Module):
    """``FastPQConv2d`` as a module, so it can take a PQConv2d's place in a network."""

    def __init__(self, layer: PQConv2d):
        super().__init__()
        self.fast = FastPQConv2d(layer)

    def forward(self, x):
        return self.fast(x)


def fast_inference_copy(model: nn.Module) -> nn.Module:
    """A copy of a calibrated PQ model whose PQConv2d layers run ``FastPQConv2d`` (inference only)."""
    fast = copy.deepcopy(model).eval()
    for name, layer in pq_layers(fast):
        if isinstance(layer, PQConv2d) and bool(layer.calibrated):
            parent_name, _, attr = name.rpartition(".")
            parent = fast.get_submodule(parent_name) if parent_name else fast
            setattr(parent, attr, _FastConvModule(layer))
    return fast
