"""The per-group quantizers against slow, loop-based references, and quantize_ on a small Llama model."""

import math

import pytest
import torch
from torch import nn

from effllm_lib.bitmod import datatypes as dt
from effllm_lib.bitmod.quantize import (BitMoDConfig, bits_per_weight, candidate_names, quantize_,
                                        quantize_tensor, relative_mse_table, OLIVE_OUTLIER_MAGNITUDES)

pytestmark = pytest.mark.usefixtures("one_thread")



# --------------------------------------------------------------------------------- loop-based references
def nearest(x, values):
    return min(values, key=lambda v: (abs(x - v), v))


def ref_absmax(group, values):
    amax = max(abs(v) for v in group)
    scale = amax / max(abs(v) for v in values)
    if scale == 0:
        return [0.0] * len(group)
    return [nearest(v / scale, values) * scale for v in group]


def mse(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


def ref_select(group, grids):
    """Every candidate, keep the first with the lowest MSE."""
    outs = [ref_absmax(group, g.values) for g in grids]
    errs = [mse(o, group) for o in outs]
    best = min(range(len(grids)), key=lambda i: (errs[i], i))
    return outs[best], best


def ref_int_asym(group, bits):
    qmax = 2 ** bits - 1
    lo, hi = min(group), max(group)
    scale = (hi - lo) / qmax
    zero = min(max(round(-lo / scale), 0), qmax)
    return [(min(max(round(v / scale) + zero, 0), qmax) - zero) * scale for v in group]


def groups_of(row, g):
    return [row[i:i + g] for i in range(0, len(row), g)]


SELECTIONS = {"bitmod": lambda b: dt.bitmod_grids(b), "er": lambda b: dt.bitmod_grids(b)[:2],
              "ea": lambda b: dt.bitmod_grids(b)[2:],
              "ant": lambda b: (dt.INT4, dt.FLINT4) if b == 4 else (dt.INT3, dt.FP3)}


def weights(rows=6, cols=80, seed=0, heavy=True):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    if heavy:  # a few large and one-sided groups so every candidate gets picked somewhere
        w[:, ::7] *= 4
        w[1 % rows] = w[1 % rows].abs()
        w[2 % rows] = -w[2 % rows].abs()
    return w


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("method", sorted(SELECTIONS))
def test_selection_equals_brute_force_with_ragged_tail(method, bits):
    w = weights()  # 80 columns with group 32 = two full groups and a tail of 16
    res = quantize_tensor(w, bits, method, group_size=32)
    grids = SELECTIONS[method](bits)
    for r in range(w.shape[0]):
        got = groups_of(res.weight[r].tolist(), 32)
        for j, group in enumerate(groups_of(w[r].tolist(), 32)):
            ref, idx = ref_select(group, grids)
            assert got[j] == pytest.approx(ref, abs=1e-12)
            assert res.type_ids[r, j].item() == idx
    assert res.n_groups == 6 * 3


@pytest.mark.parametrize("bits", [3, 4])
def test_bitmod_picks_the_true_minimum_and_uses_every_type(bits):
    w = weights(rows=64, cols=128, seed=1, heavy=False)
    best = quantize_tensor(w, bits, "bitmod", 128)
    single = [quantize_tensor(w, bits, n, 128).weight for n in ("fp_er_pos", "fp_er_neg", "fp_ea_pos", "fp_ea_neg")]
    errs = torch.stack([(q - w).pow(2).mean(-1) for q in single], -1)
    chosen = (best.weight - w).pow(2).mean(-1)
    assert torch.allclose(chosen, errs.min(-1).values)
    assert torch.equal(best.type_ids.squeeze(-1).long(), errs.argmin(-1))  # argmin returns the first minimum
    assert set(best.type_ids.flatten().tolist()) == {0, 1, 2, 3}


def test_ties_go_to_the_earlier_candidate():
    on_fp3 = torch.tensor([[4.0, -4.0, 2.0, -2.0, 1.0, -1.0, 0.0, 0.0]])  # exact in ER+ and ER- -> ER+ (id 0)
    with_minus3 = torch.tensor([[4.0, -3.0, 2.0, -2.0, 1.0, -1.0, 0.0, 0.0]])  # exact only in ER- -> id 1
    assert quantize_tensor(on_fp3, 3, "bitmod", 8).type_ids.item() == 0
    res = quantize_tensor(with_minus3, 3, "bitmod", 8)
    assert res.type_ids.item() == 1 and torch.equal(res.weight, with_minus3)


def test_int_sym_and_asym_hand_cases():
    w = torch.tensor([[0.7, -0.35, 0.1, 0.0]])
    # INT4 sym: scale 0.1 -> codes 7, -3.5 -> -4 (half to even), 1, 0
    assert quantize_tensor(w, 4, "int", 4).weight.tolist()[0] == pytest.approx([0.7, -0.4, 0.1, 0.0])
    # INT3 asym: scale (0.7+0.35)/7 = 0.15, zero point round(0.35/0.15)=2
    assert quantize_tensor(w, 3, "int_asym", 4).weight.tolist()[0] == pytest.approx([0.75, -0.3, 0.15, 0.0])


@pytest.mark.parametrize("bits", [3, 4])
def test_int_asym_equals_reference(bits):
    w = weights(rows=4, cols=64, seed=2)
    got = quantize_tensor(w, bits, "int_asym", 32).weight
    for r in range(4):
        ref = sum((ref_int_asym(gr, bits) for gr in groups_of(w[r].tolist(), 32)), [])
        assert got[r].tolist() == pytest.approx(ref, abs=1e-12)


def test_mx_power_of_two_scale_hand_case():
    g = torch.zeros(1, 32, dtype=torch.float64)
    g[0, :4] = torch.tensor([5.0, -2.4, 0.3, 1.1])
    # absmax 5: scale 2^(floor(log2 5) - floor(log2 12)) = 2^-1; 5/0.5 = 10 is a tie between 8 and 12 -> 8
    out = quantize_tensor(g, 4, "mxfp", group_size=128).weight[0, :4].tolist()  # group size fixed at 32
    # -2.4/0.5 = -4.8 -> -4; 0.3/0.5 = 0.6 -> 1; 1.1/0.5 = 2.2 -> 2
    assert out == [4.0, -2.0, 0.5, 1.0]


def test_mx_and_nvfp_fix_their_group_sizes():
    w = weights(rows=3, cols=64, seed=3)
    assert quantize_tensor(w, 4, "mxfp", 128).n_groups == 3 * 2
    assert quantize_tensor(w, 4, "nvfp", 128).n_groups == 3 * 4


def test_nvfp_equals_reference():
    w = weights(rows=4, cols=32, seed=4).float()
    got = quantize_tensor(w, 4, "nvfp", 16).weight
    tensor_scale = w.abs().max().item() / (12 * 448)
    for r in range(4):
        for j, group in enumerate(groups_of(w[r].tolist(), 16)):
            block = dt.round_to_e4m3(torch.tensor(max(map(abs, group)) / 12 / tensor_scale)).item() * tensor_scale
            ref = [nearest(v / block, dt.FP4.values) * block for v in group]
            assert got[r, 16 * j:16 * j + 16].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("bits", [3, 4])
def test_olive_pairs_and_error(bits):
    w = weights(rows=32, cols=128, seed=5)
    q = quantize_tensor(w, bits, "olive", 128).weight
    qmax = 2 ** (bits - 1) - 1
    pairs = q.unflatten(-1, (-1, 2))
    # normal codes are integers times the group's step (recovered as the smallest nonzero magnitude);
    # a pair holding a value beyond the INT range must have a zero victim
    for r in range(q.shape[0]):
        nz = q[r][q[r] != 0].abs()
        step = nz.min().item()
        codes = (q[r] / step)
        big = codes.abs() > qmax + 1e-9
        for p in range(pairs.shape[1]):
            c = codes[2 * p:2 * p + 2]
            if big[2 * p:2 * p + 2].any():
                assert (c == 0).sum() >= 1  # the victim
    # never worse than plain INT-sym per group (ratio 1 of the scale search is INT-sym)
    e_olive = (q - w).pow(2).mean(-1)
    e_int = (quantize_tensor(w, bits, "int", 128).weight - w).pow(2).mean(-1)
    assert (e_olive <= e_int + 1e-12).all() and (e_olive < e_int).any()


def test_olive_outlier_grid_matches_hand_case():
    # one huge value: 4-bit OliVe codes it on the outlier grid and zeroes its neighbour
    w = torch.zeros(1, 8, dtype=torch.float64)
    w[0] = torch.tensor([0.1, 0.2, -0.1, 0.05, 9.6, 0.3, 0.0, -0.2])
    q = quantize_tensor(w, 4, "olive", 8).weight[0]
    assert q[5].item() == 0.0  # victim
    assert q[4].item() == pytest.approx(9.6, rel=0.2)
    # INT4 with absmax 9.6 rounds every small weight to 0; OliVe keeps them (error only from the victim 0.3)
    assert (q - w[0]).pow(2).mean() < (quantize_tensor(w, 4, "int", 8).weight[0] - w[0]).pow(2).mean() / 2
    assert q[[0, 1, 2, 7]].tolist() == pytest.approx([0.1, 0.2, -0.1, -0.2])
    assert OLIVE_OUTLIER_MAGNITUDES[4][0] > 7 and OLIVE_OUTLIER_MAGNITUDES[3][0] > 3


def test_bit_accounting():
    assert bits_per_weight("bitmod", 4, 128) == 4.0625
    assert bits_per_weight("bitmod", 3, 128) == 3.0625
    assert bits_per_weight("mxfp", 4, 128) == 4.25
    assert bits_per_weight("nvfp", 4, 128) == 4.5
    assert bits_per_weight("int_asym", 4, 128) == 4 + 12 / 128
    assert bits_per_weight("bitmod", 4, 128, accounting="fp16") == 4 + 18 / 128
    assert bits_per_weight("ant", 3, 128, accounting="fp16") == 3 + 17 / 128
    assert candidate_names("bitmod", 4) == ("fp4_er_pos", "fp4_er_neg", "fp4_ea_pos", "fp4_ea_neg")


# Relative MSE to INT-asym at the same bits on synthetic groups of 128 (papers.md section 3, "Synthetic check").
PAPER_SYNTHETIC = {("gaussian", 3): 0.82, ("gaussian", 4): 0.95, ("laplace", 3): 0.68, ("laplace", 4): 0.67,
                   ("student_t3", 3): 0.70, ("student_t3", 4): 0.57}


def test_synthetic_mse_matches_paper_expectations_and_order():
    df = relative_mse_table(dtypes=("int", "fp", "er", "ea", "bitmod"), n_groups=1024, seed=0)
    rel = df.set_index(["distribution", "bits", "dtype"]).relative_mse
    for (dist, bits), paper in PAPER_SYNTHETIC.items():
        assert rel[dist, bits, "bitmod"] == pytest.approx(paper, abs=0.03), (dist, bits)
        assert rel[dist, bits, "bitmod"] < min(rel[dist, bits, "er"], rel[dist, bits, "ea"])
        assert max(rel[dist, bits, "er"], rel[dist, bits, "ea"]) < rel[dist, bits, "fp"] < rel[dist, bits, "int"]


# --------------------------------------------------------------------------------------------- the model
def tiny_llama(tie=True, hidden=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def test_quantize_model_untie_report_and_grid():
    model = tiny_llama(tie=True, hidden=96)  # 96 = 64 + a tail of 32 with group 64
    emb_before = model.get_input_embeddings().weight.detach().clone()
    linears = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = quantize_(model, BitMoDConfig(bits=3, group_size=64, dtype="bitmod"))
    assert report.untied_lm_head and model.config.tie_word_embeddings is False
    assert torch.equal(model.get_input_embeddings().weight, emb_before)  # embedding stays float
    assert not torch.equal(model.lm_head.weight, emb_before)
    assert set(report.layers.layer) == set(linears)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            ref = quantize_tensor(linears[name], 3, "bitmod", 64).weight
            assert torch.equal(m.weight, ref)
    groups = int(report.layers.groups.sum())
    assert sum(report.type_counts.values()) == groups
    numel = int(report.layers.numel.sum())
    assert report.bits_per_weight == pytest.approx((3 * numel + 8 * groups) / numel)
    assert report.nominal_bits_per_weight == 3 + 8 / 64
    assert report.mse > 0 and "bits/weight" in report.summary()
    model(torch.tensor([[1, 2, 3]]))  # still runs


def test_quantize_model_options():
    model = tiny_llama(tie=True, hidden=64)
    with pytest.raises(ValueError, match="tied"):
        quantize_(model, BitMoDConfig(untie_embeddings=False, group_size=64))
    head = model.lm_head.weight.detach().clone()
    report = quantize_(model, BitMoDConfig(include_lm_head=False, group_size=64, dtype="int", skip=("mlp",)))
    assert torch.equal(model.lm_head.weight, head) and not report.untied_lm_head
    assert not any("mlp" in n or n == "lm_head" for n in report.layers.layer)
    assert report.type_counts == {}


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="fp8"), "unknown dtype"), (dict(bits=2), "bits must be"), (dict(dtype="flint", bits=3), "FLINT"),
    (dict(group_size=0), "group_size"), (dict(accounting="x"), "accounting"),
    (dict(dtype="olive", group_size=5), "even"),
])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BitMoDConfig(**kwargs)


def test_bad_tensors_raise():
    with pytest.raises(ValueError, match="2-D"):
        quantize_tensor(torch.randn(8), 4, "int", 8)
    with pytest.raises(ValueError, match="NaN"):
        quantize_tensor(torch.tensor([[float("nan"), 1.0]]), 4, "int", 2)
    with pytest.raises(TypeError, match="floating"):
        quantize_tensor(torch.ones(2, 4, dtype=torch.int32), 4, "int", 2)
    with pytest.raises(TypeError, match="BitMoDConfig"):
        quantize_(nn.Linear(4, 4), {"bits": 4})


def test_all_zero_and_low_precision_weights():
    z = torch.zeros(2, 16)
    for d in ("int", "int_asym", "bitmod", "olive", "mxfp", "nvfp"):
        assert torch.equal(quantize_tensor(z, 4, d, 16).weight, z)
    w = weights(rows=2, cols=32).to(torch.bfloat16)
    out = quantize_tensor(w, 4, "bitmod", 32)
    assert out.weight.dtype == torch.bfloat16 and math.isfinite(out.weight.float().sum().item())


# ------------------------------------------------------------------------ clipping search and calibration
CLIP = [1 - i / 20 for i in range(10)]


def ref_absmax_ratio(group, values, ratio):
    amax = max(abs(v) for v in group) * ratio
    scale = amax / max(abs(v) for v in values)
    if scale == 0:
        return [0.0] * len(group)
    return [nearest(v / scale, values) * scale for v in group]


def wmse(a, b, w):
    return sum(wi * (x - y) ** 2 for x, y, wi in zip(a, b, w)) / len(a)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("method", ["int", "bitmod", "ant"])
def test_clip_search_equals_brute_force(method, bits):
    w = weights(rows=4, cols=80, seed=7)
    gen = torch.Generator().manual_seed(1)
    cw = torch.rand(80, generator=gen, dtype=torch.float64) * 3
    grids = SELECTIONS[method](bits) if method in SELECTIONS else (dt.int_grid(bits),)
    for col_weight in (None, cw):
        res = quantize_tensor(w, bits, method, 32, clip=True, col_weight=col_weight)
        for r in range(4):
            got = groups_of(res.weight[r].tolist(), 32)
            cws = groups_of((cw if col_weight is not None else torch.ones(80, dtype=torch.float64)).tolist(), 32)
            for j, group in enumerate(groups_of(w[r].tolist(), 32)):
                best = min(((wmse(ref_absmax_ratio(group, g.values, ra), group, cws[j]), i, -ra)
                            for i, g in enumerate(grids) for ra in CLIP), key=lambda t: t)
                ref = ref_absmax_ratio(group, grids[best[1]].values, -best[2])
                assert got[j] == pytest.approx(ref, abs=1e-12)
                if res.type_ids is not None:
                    assert res.type_ids[r, j].item() == best[1]


def test_clip_int_asym_equals_brute_force():
    w = weights(rows=3, cols=64, seed=8)
    res = quantize_tensor(w, 3, "int_asym", 32, clip=True).weight
    for r in range(3):
        for j, group in enumerate(groups_of(w[r].tolist(), 32)):
            cands = []
            for ra in CLIP:
                qmax = 7
                lo, hi = min(group) * ra, max(group) * ra
                scale = (hi - lo) / qmax
                zero = min(max(round(-lo / scale), 0), qmax)
                q = [(min(max(round(v / scale) + zero, 0), qmax) - zero) * scale for v in group]
                cands.append((mse(q, group), -ra, q))
            ref = min(cands, key=lambda t: t[:2])[2]
            assert res[r, 32 * j:32 * j + 32].tolist() == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("method", ["int", "int_asym", "fp", "bitmod", "ant", "mxfp", "nvfp", "nf4", "olive"])
def test_clip_never_hurts_and_usually_helps(method):
    w = weights(rows=64, cols=128, seed=9, heavy=False).float()
    e0 = (quantize_tensor(w, 4, method, 128).weight - w).pow(2).mean(-1)
    e1 = (quantize_tensor(w, 4, method, 128, clip=True).weight - w).pow(2).mean(-1)
    assert (e1 <= e0 + 1e-12).all()
    if method == "olive":  # OliVe searches its own scale either way: the option changes nothing
        assert torch.equal(e0, e1)
    elif method == "mxfp":
        # MX's power-of-two scale already saturates the top of the group (absmax / scale in [4, 8) vs FP4's 6);
        # a ratio >= 0.55 can only halve the scale, which never wins on Gaussian groups
        assert torch.equal(e0, e1)
    else:
        assert (e1 < e0).float().mean() > 0.3


def test_uniform_col_weight_changes_nothing_and_weighting_moves_the_choice():
    w = weights(rows=16, cols=128, seed=10, heavy=False)
    plain = quantize_tensor(w, 3, "bitmod", 64, clip=True)
    uniform = quantize_tensor(w, 3, "bitmod", 64, clip=True, col_weight=torch.full((128,), 2.5, dtype=torch.float64))
    assert torch.equal(plain.weight, uniform.weight) and torch.equal(plain.type_ids, uniform.type_ids)
    cw = torch.ones(128, dtype=torch.float64)
    cw[::16] = 100.0  # a few important input channels
    weighted = quantize_tensor(w, 3, "bitmod", 64, clip=True, col_weight=cw)
    err = lambda q: ((q - w).pow(2) * cw).sum()  # noqa: E731
    assert err(weighted.weight) < err(plain.weight)
    with pytest.raises(ValueError, match="col_weight"):
        quantize_tensor(w, 3, "bitmod", 64, col_weight=torch.ones(5))
    with pytest.raises(ValueError, match="non-negative"):
        quantize_tensor(w, 3, "bitmod", 64, col_weight=-torch.ones(128))


def test_nf4_values_and_brute_force():
    # QLoRA's NF4 code book: 16 values, -1 and 1 at the ends, one exact zero, asymmetric around it
    from effllm_lib.bitmod.quantize import NF4
    assert len(NF4.values) == 16 and NF4.values[0] == -1 and NF4.values[-1] == 1 and NF4.values[7] == 0
    w = weights(rows=3, cols=64, seed=11)
    got = quantize_tensor(w, 4, "nf4", 32).weight
    for r in range(3):
        ref = sum((ref_absmax(g, NF4.values) for g in groups_of(w[r].tolist(), 32)), [])
        assert got[r].tolist() == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError, match="NF4"):
        BitMoDConfig(dtype="nf4", bits=3)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=2, n_positions=32)).eval()


def test_gpt2_conv1d_layers_are_quantized():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    convs = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert len(convs) == 8  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per block
    report = quantize_(model, BitMoDConfig(bits=4, group_size=32, dtype="bitmod"))
    assert set(convs) | {"lm_head"} == set(report.layers.layer)
    for name, m in model.named_modules():
        if isinstance(m, Conv1D):  # Conv1D stores [in, out]: the groups run along in, i.e. down its columns
            ref = quantize_tensor(convs[name].t().contiguous(), 4, "bitmod", 32).weight.t()
            assert torch.equal(m.weight, ref), name
    assert "transformer.wte" in report.skipped and "transformer.wpe" in report.skipped
    model(torch.tensor([[1, 2, 3]]))


def test_unsupported_layer_raises_naming_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.fc = nn.Linear(16, 16)

    with pytest.raises(ValueError, match=r"conv \(Conv2d\)"):
        quantize_(Net(), BitMoDConfig(group_size=16))
    report = quantize_(Net(), BitMoDConfig(group_size=16, skip=("conv",)))
    assert list(report.layers.layer) == ["fc"]


def test_activation_stats_against_direct_computation():
    from effllm_lib.bitmod.calibrate import collect_activation_stats

    model = tiny_llama(tie=False, hidden=64)
    windows = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    stats = collect_activation_stats(model, windows, sample_tokens=12)
    # the input of layer 0's q/k/v is the normed embedding, computed here by hand
    layer = model.model.layers[0]
    x = layer.input_layernorm(model.model.embed_tokens(windows)).reshape(-1, 64)
    for n in ("q_proj", "k_proj", "v_proj"):
        st = stats[f"model.layers.0.self_attn.{n}"]
        assert st.tokens == 48 and st.group == "model.layers.0.self_attn.q_proj"
        assert torch.allclose(st.sq_mean, x.pow(2).mean(0), rtol=1e-5, atol=1e-7)
        assert torch.allclose(st.abs_mean, x.abs().mean(0), rtol=1e-5, atol=1e-7)
        assert st.sample.shape == (12, 64)
        # every sampled row is one of the real input rows
        assert all(torch.isclose(x, row, atol=1e-6).all(1).any() for row in st.sample)
    assert stats["model.layers.0.mlp.up_proj"].group == "model.layers.0.mlp.gate_proj"
    assert stats["model.layers.0.self_attn.o_proj"].group == "model.layers.0.self_attn.o_proj"
    assert stats["model.layers.0.mlp.down_proj"].group == "model.layers.0.mlp.down_proj"
    assert stats["model.layers.0.mlp.down_proj"].sq_mean.shape == (256,)


def test_awq_picks_the_alpha_with_the_lowest_output_error():
    from effllm_lib.bitmod.calibrate import collect_activation_stats
    from effllm_lib.bitmod.quantize import AWQ_ALPHAS

    model = tiny_llama(tie=False, hidden=64)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    stats = collect_activation_stats(model, windows, sample_tokens=64)
    name = "model.layers.1.mlp.down_proj"
    w0 = model.get_submodule(name).weight.detach().clone()
    report = quantize_(model, BitMoDConfig(bits=3, group_size=64, dtype="int", calibration="awq"), calibration=stats)
    st = stats[name]
    x = st.sample

    def out_err(wq):
        return float((x @ (wq - w0).t()).pow(2).mean())

    errs = []
    for a in AWQ_ALPHAS:  # the search by hand: s = mean|x|^a normalised by sqrt(max * min)
        s = st.abs_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        errs.append(out_err(quantize_tensor(w0 * s, 3, "int", 64).weight / s))
    alpha = report.layers.set_index("layer").awq_alpha[name]
    assert alpha == AWQ_ALPHAS[min(range(len(errs)), key=errs.__getitem__)]
    got = out_err(model.get_submodule(name).weight.detach())
    assert got == pytest.approx(min(errs), rel=1e-5) and got <= errs[0]  # alpha 0 is plain round to nearest
    assert report.layers.awq_alpha.notna().all()


def test_calibrated_modes_need_statistics():
    model = tiny_llama(hidden=64)
    with pytest.raises(ValueError, match="needs activation statistics"):
        quantize_(model, BitMoDConfig(group_size=64, calibration="act"))
    with pytest.raises(ValueError, match="no calibration statistics"):
        quantize_(model, BitMoDConfig(group_size=64, calibration="act"), calibration={})
    with pytest.raises(ValueError, match="calibration must be"):
        BitMoDConfig(calibration="smoothquant")
    assert BitMoDConfig(dtype="int_asym", bits=4, clip=True, calibration="awq").label == "int_asym4+clip+awq"


# ------------------------------------------------------------------------------------------------ IQ4_NL
KV = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def best_index_int8(x):
    """llama.cpp's best_index_int8, transcribed."""
    if x <= KV[0]:
        return 0
    if x >= KV[-1]:
        return 15
    lo, hi = 0, 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < KV[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if x - KV[hi - 1] < KV[hi] - x else hi


def ref_iq4_nl(xb, qw=None):
    """llama.cpp's quantize_row_iq4_nl_impl for one block of 32 (ntry = 7), scalar loops."""
    import numpy as np
    sigma2 = 2 * sum(v * v for v in xb) / len(xb)
    w = [v * v for v in xb] if qw is None else [q * math.sqrt(sigma2 + v * v) for q, v in zip(qw, xb)]
    amax, mx = 0.0, 0.0
    for v in xb:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < 1e-15:
        return [0.0] * len(xb)

    def fit(inv):
        sqx = sq2 = 0.0
        for v, wi in zip(xb, w):
            q = KV[best_index_int8(inv * v)]
            sqx += wi * q * v
            sq2 += wi * q * q
        return sqx, sq2

    sqx, sq2 = fit(1 / (-mx / KV[0]))
    d = sqx / sq2
    best = d * sqx
    for itry in range(-7, 8):
        sqx, sq2 = fit((itry + KV[0]) / mx)
        if sq2 > 0 and sqx * sqx > best * sq2:
            d = sqx / sq2
            best = d * sqx
    d16 = float(np.float16(d))
    return [d16 * KV[best_index_int8(v / d)] for v in xb]


def test_iq4_nl_equals_llama_cpp_transcription():
    w = weights(rows=3, cols=96, seed=12)
    got = quantize_tensor(w, 4, "iq4_nl", 128).weight  # the group is fixed at 32
    gen = torch.Generator().manual_seed(2)
    qw = torch.rand(96, generator=gen, dtype=torch.float64) + 0.1
    got_w = quantize_tensor(w, 4, "iq4_nl", 128, col_weight=qw).weight
    for r in range(3):
        for j, group in enumerate(groups_of(w[r].tolist(), 32)):
            assert got[r, 32 * j:32 * j + 32].tolist() == pytest.approx(ref_iq4_nl(group), abs=1e-12)
            ref = ref_iq4_nl(group, qw[32 * j:32 * j + 32].tolist())
            assert got_w[r, 32 * j:32 * j + 32].tolist() == pytest.approx(ref, abs=1e-12)


def test_iq4_nl_blocks_decode_with_the_gguf_package():
    """Pack our codes and FP16 scales into GGUF IQ4_NL blocks; gguf's own dequantizer must give our values."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from effllm_lib.bitmod.quantize import _iq4_nl
    x = weights(rows=8, cols=32, seed=13).float()
    deq, d16 = _iq4_nl(x)
    idx = torch.tensor([[KV.index(int(round(v))) for v in row] for row in (deq / d16).tolist()], dtype=torch.uint8)
    qs = (idx[:, :16] | (idx[:, 16:] << 4)).numpy()
    blocks = np.concatenate([d16.numpy().astype(np.float16).view(np.uint8).reshape(8, 2), qs], 1)
    decoded = dequantize(blocks.reshape(-1), GGMLQuantizationType.IQ4_NL)
    assert np.array_equal(decoded.reshape(8, 32), deq.numpy())
    assert bits_per_weight("iq4_nl", 4, 128, accounting="fp16") == 4.5
    assert bits_per_weight("iq4_nl", 4, 128) == 4.25
