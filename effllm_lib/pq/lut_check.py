"""Is the LUT kernel right? Its output against the float PQ layer and the int8 rounding bound, per kernel.

    check(["kws_0", "emnist_4"])     # one row per (shape, kernel, encoder)

For each pointwise shape of the paper's networks (``accelerator.load_layers``: ``kws_<i>``, ``emnist_<i>``), a 1x1
PQ conv (N_p 16, L_s 4) gets k-means prototypes from post-ReLU-like inputs (|N(0, 1)|), then every kernel this CPU
can run (``lut_kernel.available_kernels``) computes the layer. Columns:

* ``codes_match``: fraction of sub-vectors whose kernel code is the reference code: the PQ layer's own nearest
  prototype (exact encoder; float ties aside it should be 1) or the hash tree's torch traversal ``HashTree.encode`` (tree encoder);
* ``max_err`` / ``bound``: the largest |kernel - float table sum of the reference codes| over outputs, and the
  int8 bound N_s * scale_c / 2 (each table entry rounded to the nearest of 255 steps); ``within_bound``;
* ``rel_err_vs_dense``: what PQ itself costs, ||PQ - dense|| / ||dense||, for scale.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import accelerator as A
from . import lut_kernel as L
from .layers import PQConfig, PQConv2d
from .train import kmeans


def shape_of(name: str) -> A.Layer:
    """The layer ``<network>_<index>`` of ``data/pqa/<network>.csv`` (e.g. ``kws_0``)."""
    net, _, index = name.rpartition("_")
    if not net or not index.isdigit():
        raise ValueError(f"shape names look like 'kws_0' or 'emnist_4', got {name!r}")
    layers = A.load_layers(net)
    if int(index) >= len(layers):
        raise ValueError(f"{net} has {len(layers)} PQ layers, no index {index}")
    layer = layers[int(index)]
    if layer.kernel != 1 or layer.stride != 1:
        raise ValueError(f"{name} is a {layer.kernel}x{layer.kernel} stride-{layer.stride} layer; the LUT kernel "
                         "runs pointwise (1x1, stride 1) layers only")
    return layer


def table_sum(layer, codes: torch.Tensor) -> torch.Tensor:
    """y[m] = sum_s LUT[s, codes[m, s]] + bias, in float (the definition of a PQ layer's output)."""
    n_s = layer.n_subspaces
    out = layer.lut.detach()[torch.arange(n_s), codes].sum(1)  # [M, C]
    return out + layer.bias.detach() if layer.bias is not None else out


@torch.no_grad()
def check(shapes=("kws_0", "emnist_4"), *, batch: int = 2, subvec_len: int = 4, seed: int = 0,
          kernels=None) -> "pd.DataFrame":
    import pandas as pd

    kernels = L.available_kernels() if kernels is None else list(kernels)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in shapes:
        s = shape_of(name)
        dense = nn.Conv2d(s.in_ch, s.out_ch, 1).eval()
        with torch.no_grad():
            dense.weight.copy_(torch.randn(dense.weight.shape, generator=gen) / s.in_ch ** 0.5)
            dense.bias.copy_(0.1 * torch.randn(s.out_ch, generator=gen))
        layer = PQConv2d.from_dense(dense, PQConfig(n_prototypes=16, subvec_len=subvec_len)).eval()
        x = torch.randn(batch, s.in_ch, s.in_h, s.in_w, generator=gen).abs()
        calib = layer.rows(x)
        sub = F.pad(calib, (0, layer.pad)).view(len(calib), layer.n_subspaces, subvec_len).transpose(0, 1)
        layer.set_prototypes(kmeans(sub, 16, iters=10, seed=seed))
        ref_pq, ref_dense = layer(x), dense(x)
        for encoder in ("exact", "tree"):
            tree = L.fit_hash_tree(layer, calib) if encoder == "tree" else None
            pq = layer
            if tree is not None:  # the tree comes with its own prototypes (its leaves' means)
                pq = PQConv2d.from_dense(dense, layer.config).eval()
                pq.set_prototypes(tree.prototypes)
            rows_in = pq.rows(x)  # [B*H*W, D], (b, h, w) order
            want = pq.encode(rows_in) if tree is None else tree.encode(rows_in)  # [M, N_s]
            ref = table_sum(pq, want).view(batch, s.in_h, s.in_w, -1).permute(0, 3, 1, 2)
            for kernel in kernels:
                kern = L.PQLutKernel(pq, tree=tree, kernel=kernel)
                out = kern(x)
                x_fm, per_image = kern._feature_major(x)
                codes = kern.codes(x_fm)
                hw = s.in_h * s.in_w
                got = (codes[:, :kern.n_sub, :hw].permute(0, 2, 1).reshape(-1, kern.n_sub) if per_image
                       else codes[0, :kern.n_sub, :batch * hw].t())
                bound = float((kern.n_sub * kern.scale / 2).max())
                err = float((out - ref).abs().max())
                rows.append({"shape": name, "in_features": s.in_ch, "out_features": s.out_ch,
                             "rows": batch * hw, "kernel": kernel, "encoder": encoder,
                             "codes_match": float((got.long() == want.long()).float().mean()),
                             "max_err": err, "bound": bound, "within_bound": err <= bound * (1 + 1e-5),
                             "rel_err_vs_dense": float((ref_pq - ref_dense).norm() / ref_dense.norm())})
    return pd.DataFrame(rows)
