"""GPTQ on the study's grids (effllm_lib.bitmod.gptq), against a plain implementation of the recurrence."""

import pytest
import torch

from effllm_lib.bitmod import datatypes as dt
from effllm_lib.bitmod.gptq import gptq_quantize
from effllm_lib.bitmod.quantize import BitMoDConfig, quantize_, quantize_tensor

ALL = [(d, b) for b in (3, 4) for d in ("int", "int_asym", "fp", "flint", "bitmod", "er", "ea", "ant", "olive",
                                        "nf4", "iq4_nl", "mxfp", "nvfp", "fp_ea_neg")
       if not (b == 3 and d in ("flint", "nf4", "iq4_nl"))]


def _weights(rows, cols, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=dtype) / (1 + torch.rand(rows, cols, generator=g, dtype=dtype))
    return w


def _correlated_inputs(n, cols, seed=1):
    """Inputs with correlated channels and unequal channel scales (as LLM activations have)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * torch.linspace(1, 0.05, cols, dtype=torch.float64)
    x = torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix.t()
    return x * torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("dtype,bits", ALL)
def test_identity_hessian_is_round_to_nearest(dtype, bits):
    """No correlation, no feedback: GPTQ must round every column exactly as round to nearest does."""
    w = _weights(24, 160, seed=bits, dtype=torch.float32)  # 160 = one group of 128 + a tail of 32
    for clip in (False, True):
        ref = quantize_tensor(w, bits, dtype, 128, clip=clip, search="torch")
        got = gptq_quantize(w, torch.eye(160), bits, dtype, 128, clip=clip)
        assert torch.equal(got.weight, ref.weight), (dtype, bits, clip)
        if ref.type_ids is not None:
            assert torch.equal(got.type_ids, ref.type_ids)
        assert got.n_groups == ref.n_groups


# ---------------------------------------------------------------- the reference: the recurrence written plainly
def _ref_group_params(cur, kind, bits):
    """Per row of the group ``cur``: a function rounding a column value, built from the grid VALUES only."""
    rows = cur.shape[0]
    if kind == "int_asym":
        qmax = 2 ** bits - 1
        out = []
        for r in range(rows):
            lo, hi = float(cur[r].min()), float(cur[r].max())
            s = (hi - lo) / qmax
            z = min(max(round(-lo / s), 0), qmax)
            out.append(lambda v, s=s, z=z: (min(max(round(v / s) + z, 0), qmax) - z) * s)
        return out
    grids = {"int": [dt.int_grid(bits).values], "nf4": [(-1.0, -0.6961928009986877, -0.5250730514526367,
                                                         -0.39491748809814453, -0.28444138169288635,
                                                         -0.18477343022823334, -0.09105003625154495, 0.0,
                                                         0.07958029955625534, 0.16093020141124725,
                                                         0.24611230731010437, 0.33791524171829224,
                                                         0.44070982933044434, 0.5626170039176941,
                                                         0.7229568362236023, 1.0)],
             "bitmod": [g.values for g in dt.bitmod_grids(bits)]}[kind]
    out = []
    for r in range(rows):
        best = None
        for vals in grids:  # the grid with the lowest squared error on the group, first one on ties
            s = float(cur[r].abs().max()) / max(abs(v) for v in vals)
            rnd = lambda v, s=s, vals=vals: min(vals, key=lambda u: abs(v / s - u)) * s  # noqa: E731
            err = sum((float(v) - rnd(float(v))) ** 2 for v in cur[r])
            if best is None or err < best[0]:
                best = (err, rnd)
        out.append(best[1])
    return out


def ref_gptq(w, h, kind, bits, group):
    """GPTQ's recurrence as the paper states it (OBS, no Cholesky, no blocks): quantize column j, spread its
    error over the remaining columns with the inverse Hessian, then remove j from the inverse."""
    W = w.double().clone()
    H = h.double().clone()
    H += 0.01 * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % group == 0:
            params = _ref_group_params(W[:, j:j + group], kind, bits)
        Q[:, j] = torch.tensor([params[r](float(W[r, j])) for r in range(W.shape[0])], dtype=W.dtype)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1:] -= torch.outer(err, Hinv[j, j + 1:])
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


@pytest.mark.parametrize("kind,bits", [("int", 4), ("int", 3), ("int_asym", 3), ("nf4", 4), ("bitmod", 3),
                                       ("bitmod", 4)])
def test_against_the_plain_recurrence(kind, bits):
    w = _weights(6, 40, seed=2)
    x = _correlated_inputs(200, 40)
    h = x.t() @ x / len(x)
    ref = ref_gptq(w, h, kind, bits, group=8)
    # block 16 with group 8: groups start inside blocks and lazy updates cross block edges; block 12: groups
    # straddle blocks, so a group's type and scale need the block's pending updates
    got = gptq_quantize(w, h, bits, kind, 8, block=16).weight
    assert torch.allclose(got, gptq_quantize(w, h, bits, kind, 8, block=12).weight, rtol=0, atol=1e-9)
    # 1e-6: NF4's levels are float32 constants in the library; a rounding flip would differ by a grid step
    assert torch.allclose(got, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(got, quantize_tensor(w, bits, kind, 8).weight)  # the feedback did something


# The drop we measured on these inputs: 0.64-0.72 of RTN's output error for every type but OliVe-3 (0.92: its
# victims are zeroed whole, and the feedback pushes more neighbours past the outlier threshold).
@pytest.mark.parametrize("dtype,bits,at_most", [("int_asym", 4, 0.8), ("int_asym", 3, 0.8), ("nf4", 4, 0.8),
                                                ("bitmod", 4, 0.8), ("bitmod", 3, 0.8), ("ant", 3, 0.8),
                                                ("olive", 4, 0.8), ("olive", 3, 1.0)])
def test_output_error_drops_vs_round_to_nearest(dtype, bits, at_most):
    w = _weights(128, 256, seed=3, dtype=torch.float32)
    x = _correlated_inputs(2048, 256).float()
    h = x.t() @ x / len(x)

    def out_err(wq):
        return float((x @ (wq - w).t()).norm())

    rtn = out_err(quantize_tensor(w, bits, dtype, 128).weight)
    gptq = out_err(gptq_quantize(w, h, bits, dtype, 128).weight)
    assert gptq < at_most * rtn, (gptq, rtn)


def test_dead_channels_and_bad_input():
    w = _weights(4, 16, dtype=torch.float32)
    h = torch.eye(16)
    h[3, 3] = 0  # a channel that never fires: GPTQ zeroes its weights
    assert (gptq_quantize(w, h, 4, "int", 8).weight[:, 3] == 0).all()
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, torch.eye(8), 4, "int", 8)
    with pytest.raises(ValueError, match="finite"):
        gptq_quantize(w, torch.full((16, 16), float("nan")), 4, "int", 8)
    with pytest.raises(ValueError, match="2-D"):
        gptq_quantize(w[0], h, 4, "int", 8)
    with pytest.raises(RuntimeError, match="positive definite"):
        gptq_quantize(w, -torch.eye(16) * 1e3 + torch.ones(16, 16), 4, "int", 8, damp=0.0)


def test_quantize_model_with_gptq():
    from effllm_lib.bitmod.calibrate import collect_activation_stats
    from test_bitmod_quantize import tiny_llama

    model = tiny_llama(tie=False, hidden=64)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="hessian=True"):
        quantize_(model, BitMoDConfig(bits=3, group_size=64, calibration="gptq"),
                  calibration=collect_activation_stats(model, windows))
    stats = collect_activation_stats(model, windows, hessian=True)
    name = "model.layers.0.self_attn.k_proj"
    # the Gram matrix by hand: the normed embedding feeds q/k/v of layer 0
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(windows)).reshape(-1, 64).detach()
    assert torch.allclose(stats[name].xtx, x.t() @ x / len(x), rtol=1e-4, atol=1e-6)
    assert stats[name].xtx is stats["model.layers.0.self_attn.q_proj"].xtx
    w0 = model.get_submodule(name).weight.detach().clone()
    report = quantize_(model, BitMoDConfig(bits=3, group_size=64, dtype="bitmod", calibration="gptq"),
                       calibration=stats)
    assert torch.equal(model.get_submodule(name).weight, gptq_quantize(w0, stats[name].xtx, 3, "bitmod", 64).weight)
    assert sum(report.type_counts.values()) == int(report.layers.groups.sum())
    assert BitMoDConfig(calibration="gptq", dtype="nf4").label == "nf44+gptq"
