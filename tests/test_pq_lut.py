"""The CPU LUT kernel against the float PQ reference (effllm_lib.pq.layers), brute-force loops and known clusters.

Every kernel this CPU can run is tested (the AVX-512 VBMI one only where the CPU has it: run this file on the
device's Xeon too). Outputs are written into NaN-poisoned buffers so a row or channel left unwritten fails.
"""
import math

import pytest
import torch
import torch.nn as nn

from effllm_lib.pq import PQConfig, PQConv2d, PQLinear
from effllm_lib.pq import lut_kernel as L

KERNELS = L.available_kernels()


def _conv_layer(cin, cout, l_s, n_p, seed=0, bias=True):
    torch.manual_seed(seed)
    layer = PQConv2d.from_dense(nn.Conv2d(cin, cout, 1, bias=bias), PQConfig(n_prototypes=n_p, subvec_len=l_s))
    layer.set_prototypes(torch.randn_like(layer.prototypes))
    return layer.eval()


def _distances64(rows, layer):
    """Brute-force squared distances [M, N_s, N_p] in float64."""
    x = nn.functional.pad(rows.double(), (0, layer.pad)).view(rows.shape[0], layer.n_subspaces, -1)
    p = (layer.prototypes * layer.proto_mask).double()
    return ((x[:, :, None, :] - p[None]) ** 2).sum(-1)


def _kernel_codes(kern, x_fm, n_sub, rows_per_image):
    codes = kern.codes(x_fm)[:, :n_sub, :rows_per_image]
    return codes.permute(0, 2, 1).reshape(-1, n_sub).long()


# (Cin, Cout, L_s, N_p, B, H, W): odd D (not a multiple of L_s), N_s not a multiple of 4, odd rows and outputs,
# N_p < 16, N_s > 256 (the AVX2 kernel's int16 chunking), the L_s = 4 and 8 fast paths, maps of >= 64 pixels
# (one row block per image) and smaller ones (the batch pooled into one block)
SHAPES = [(37, 29, 4, 16, 2, 9, 8), (64, 130, 4, 12, 1, 9, 9), (300, 5, 1, 16, 1, 3, 3), (48, 67, 8, 16, 3, 4, 11),
          (10, 3, 3, 7, 1, 1, 1)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_conv_matches_float_pq_within_the_int8_bound(kernel, shape):
    cin, cout, l_s, n_p, b, h, w = shape
    layer = _conv_layer(cin, cout, l_s, n_p)
    x = torch.randn(b, cin, h, w)
    ref = layer(x).detach()
    rows = layer.rows(x)
    kern = L.PQLutKernel(layer, kernel=kernel)
    out = torch.full(ref.shape, math.nan)
    assert kern(x, out=out) is out and not out.isnan().any()

    # codes: the nearest prototype, as the layer computes it; a differing code must be a float near-tie
    codes = _kernel_codes(kern, x.view(b, cin, -1), layer.n_subspaces, h * w)
    ref_codes = layer.encode(rows)
    diff = codes != ref_codes
    if diff.any():
        d = _distances64(rows, layer)
        picked, best = d.gather(2, codes[..., None])[..., 0], d.gather(2, ref_codes[..., None])[..., 0]
        assert torch.allclose(picked[diff], best[diff], rtol=1e-5, atol=1e-5)
    assert diff.float().mean() < 1e-3

    # output: each int8 table entry is within scale/2 of the float LUT, so the sum within N_s * scale / 2
    _, lut = layer.quantized_tables()
    scale = (lut.abs().amax(dim=(0, 1)) / 127).detach()
    bound = layer.n_subspaces * scale / 2 * (1 + 1e-4) + 1e-5
    got_rows, ref_rows = out.permute(0, 2, 3, 1).reshape(-1, cout), ref.permute(0, 2, 3, 1).reshape(-1, cout)
    ok = ~diff.any(1)
    assert ((got_rows - ref_rows).abs()[ok] <= bound).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_output_is_the_integer_table_sum_brute_force(kernel):
    layer = _conv_layer(13, 6, 3, 16, seed=3)
    x = torch.randn(2, 13, 3, 5)
    kern = L.PQLutKernel(layer, kernel=kernel)
    out = kern(x)
    codes = _kernel_codes(kern, x.view(2, 13, -1), layer.n_subspaces, 15)
    _, lut = layer.quantized_tables()
    lut = lut.detach()
    scale = (lut.abs().amax(dim=(0, 1)) / 127).clamp(min=1e-12)
    q = torch.round(lut / scale).clamp(-127, 127)
    rows = out.permute(0, 2, 3, 1).reshape(-1, 6)
    for m in range(codes.shape[0]):
        for c in range(6):
            total = sum(int(q[s, codes[m, s], c]) for s in range(layer.n_subspaces))
            want = total * float(scale[c]) + float(layer.bias[c].detach())
            assert rows[m, c].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_linear_any_leading_shape(kernel):
    torch.manual_seed(4)
    layer = PQLinear.from_dense(nn.Linear(45, 70, bias=False), PQConfig(16, 4))
    layer.set_prototypes(torch.randn_like(layer.prototypes))
    layer.eval()
    x = torch.randn(3, 7, 45)
    kern = L.PQLutKernel(layer, kernel=kernel)
    out = torch.full((3, 7, 70), math.nan)
    kern(x, out=out)
    ref = layer(x).detach()
    _, lut = layer.quantized_tables()
    bound = layer.n_subspaces * (lut.abs().amax(dim=(0, 1)) / 127).detach() / 2 * (1 + 1e-4) + 1e-5
    codes_agree = (layer.encode(x.reshape(-1, 45)) == _kernel_codes(kern, x.reshape(-1, 45).t().contiguous()[None],
                                                                      layer.n_subspaces, 21)).all(1)
    err = (out - ref).reshape(-1, 70)[codes_agree].abs()
    assert codes_agree.float().mean() > 0.95 and (err <= bound).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_long_sums_do_not_overflow(kernel):
    # 300 subspaces whose entries are all the largest int8 step: 300 * 127 overflows int16 sums
    layer = PQLinear.from_dense(nn.Linear(300, 5), PQConfig(16, 1))
    layer.set_prototypes(torch.randn_like(layer.prototypes))
    with torch.no_grad():
        layer.lut.fill_(0.5)
    out = L.PQLutKernel(layer.eval(), kernel=kernel)(torch.randn(70, 300))
    torch.testing.assert_close(out, (300 * 0.5 + layer.bias.detach()).expand(70, 5), rtol=1e-5, atol=1e-4)


def test_kernels_agree_on_the_same_codes():
    if len(KERNELS) < 2:
        pytest.skip("only the portable kernel runs here")
    layer = _conv_layer(40, 33, 4, 16, seed=5)
    kern = {k: L.PQLutKernel(layer, kernel=k) for k in KERNELS}
    x = torch.randn(2, 40, 6, 7)
    codes = kern["portable"].codes(x.view(2, 40, -1))
    outs = {}
    for k, kn in kern.items():
        out = torch.full((2, 33, 42), math.nan)
        assert L.load_extension().lookup(codes, kn.tables, kn.scale, kn.bias, out, k) == ""
        outs[k] = out
    for k in KERNELS[1:]:
        torch.testing.assert_close(outs[k], outs["portable"], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------- hash tree
def _traverse(tree, row):
    """Plain-loop reference of the tree: node = 2 * node + (x[dim] > threshold)."""
    codes = []
    for s in range(tree.dims.shape[0]):
        node = 0
        for level in range(4):
            node = 2 * node + int(row[int(tree.dims[s, level])] > tree.thresholds[s, level, node])
        codes.append(node)
    return codes


@pytest.mark.parametrize("kernel", KERNELS)
def test_tree_codes_match_a_plain_traversal(kernel):
    torch.manual_seed(6)
    layer = PQLinear.from_dense(nn.Linear(22, 9), PQConfig(16, 4)).eval()
    calib = torch.randn(400, 22)
    tree = L.fit_hash_tree(layer, calib)
    layer.set_prototypes(tree.prototypes)
    x = torch.randn(37, 22)
    kern = L.PQLutKernel(layer, tree=tree, kernel=kernel)
    got = _kernel_codes(kern, x.t().contiguous()[None], layer.n_subspaces, 37)
    want = torch.tensor([_traverse(tree, row) for row in x])
    assert torch.equal(got, want)
    out = kern(x)
    # the tree's codes index the same tables the layer builds from its (leaf-mean) prototypes
    lut = layer.lut.detach()
    ref = sum(lut[s, want[:, s]] for s in range(layer.n_subspaces)) + layer.bias.detach()
    bound = layer.n_subspaces * (lut.abs().amax(dim=(0, 1)) / 127) / 2 * (1 + 1e-4) + 1e-5
    assert ((out - ref).abs() <= bound).all()


def test_fit_hash_tree_separates_sixteen_clusters():
    # 16 tight clusters at the corners of {0, 10}^4: a 4-level tree must give each its own leaf
    gen = torch.Generator().manual_seed(7)
    corners = torch.tensor([[i >> 3 & 1, i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(16)]).float() * 10
    label = torch.arange(16).repeat(40)
    rows = corners[label] + 0.1 * torch.randn(640, 4, generator=gen)
    layer = PQLinear.from_dense(nn.Linear(4, 3), PQConfig(16, 4))
    tree = L.fit_hash_tree(layer, rows)
    codes = torch.tensor([_traverse(tree, r)[0] for r in rows])
    pairs = set(zip(label.tolist(), codes.tolist()))
    assert len(pairs) == 16 and len({c for _, c in pairs}) == 16  # a bijection clusters <-> leaves
    for lab, code in pairs:
        assert torch.allclose(tree.prototypes[0, code], corners[lab], atol=0.05)


# ------------------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    layer = _conv_layer(8, 4, 4, 16)
    with pytest.raises(ValueError, match="unknown kernel"):
        L.PQLutKernel(layer, kernel="neon")
    missing = [k for k in L.KERNELS if k not in KERNELS]
    if missing:
        with pytest.raises(RuntimeError, match="cannot run on this CPU"):
            L.PQLutKernel(layer, kernel=missing[0])
    with pytest.raises(ValueError, match="N_p must be <= 16"):
        L.PQLutKernel(_conv_layer(8, 4, 4, 32))
    with pytest.raises(ValueError, match="proto_bits"):
        low = PQConv2d.from_dense(nn.Conv2d(8, 4, 1), PQConfig(16, 4, proto_bits=4))
        low.set_prototypes(torch.randn_like(low.prototypes))
        L.PQLutKernel(low)
    with pytest.raises(ValueError, match="pointwise"):
        wide = PQConv2d.from_dense(nn.Conv2d(8, 4, 3), PQConfig(16, 4))
        wide.set_prototypes(torch.randn_like(wide.prototypes))
        L.PQLutKernel(wide)
    with pytest.raises(RuntimeError, match="not calibrated"):
        L.PQLutKernel(PQConv2d.from_dense(nn.Conv2d(8, 4, 1), PQConfig(16, 4)))
    with pytest.raises(TypeError, match="PQLinear or PQConv2d"):
        L.PQLutKernel(nn.Linear(3, 3))
    kern = L.PQLutKernel(layer)
    with pytest.raises(ValueError, match="expected input"):
        kern(torch.randn(1, 9, 2, 2))
    with pytest.raises(TypeError, match="float32"):
        kern(torch.randn(1, 8, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        kern(torch.randn(1, 8, 2, 2), out=torch.empty(1, 4, 2, 3))
    with pytest.raises(ValueError, match="tree does not fit"):
        L.PQLutKernel(layer, tree=L.HashTree(torch.zeros(5, 4, dtype=torch.int32), torch.zeros(5, 4, 8),
                                             torch.zeros(5, 16, 4)))
    with pytest.raises(ValueError, match="at least 16 rows"):
        L.fit_hash_tree(layer, torch.randn(3, 8))
