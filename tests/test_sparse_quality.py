"""What the pruning thresholds actually zero on grid-valued (4-bit-like) weights, against numpy brute force."""

import numpy as np
import pytest
import torch

from effllm_lib.models import tiny_causal_lm
from effllm_lib.sparse.quality import sparsity_reached
from effllm_lib.sparse.sparsify import hf_targets


def grid_model(levels=4):
    """A tiny Llama whose linears hold few distinct values (exact zeros and many ties), like dequantized Q4."""
    model, tok = tiny_causal_lm("llama", tokenizer="byte", hidden=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in hf_targets(model):
            w = model.get_submodule(n).weight
            w.copy_(torch.randint(-levels, levels + 1, w.shape, generator=g).float() * 0.01)
    return model, tok


def brute(weights, sparsity, norms=None):
    """(asked, zeroed by '<= k-th smallest score', already zero) fractions, by a full numpy sort."""
    asked = le = zero = total = 0
    for name, w in weights.items():
        w = w.numpy().astype(np.float64)
        if norms is None:
            groups = [np.abs(w).ravel()]
        else:
            groups = list(np.abs(w) * norms[name].numpy().astype(np.float32)[None, :].astype(np.float64))
        for s in groups:
            k = int(round(sparsity * s.size))
            asked += k
            if k:
                le += int((s <= np.sort(s)[k - 1]).sum())
        zero += int((w == 0).sum())
        total += w.size
    return asked / total, le / total, zero / total


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.7])
def test_magnitude_on_a_grid(sparsity):
    model, _ = grid_model()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in hf_targets(model)}
    row = sparsity_reached(model, [sparsity], ["magnitude"]).iloc[0]
    asked, le, zero = brute(weights, sparsity)
    assert row.asked == pytest.approx(asked) and row.at_or_below == pytest.approx(le)
    assert row.zero_before == pytest.approx(zero) and 0.05 < zero < 0.2  # 1 of 9 grid values is 0
    # the pruning zeroes exactly what is asked (or the zeros already there, when more), never the whole tie
    assert row.reached == pytest.approx(max(asked, zero), abs=1e-12)
    if sparsity > 0:
        assert row.at_or_below > row.reached + 0.05  # a plain threshold would over-prune on this grid
    for n, w in weights.items():  # the model itself is left as it was
        assert torch.equal(model.get_submodule(n).weight, w)


def test_wanda_counts_with_given_calibration():
    model, _ = grid_model()
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in hf_targets(model)}
    calib = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(1))]
    from effllm_lib.sparse import input_norms

    norms = input_norms(model, list(weights), calib)
    row = sparsity_reached(model, [0.5], ["wanda"], calibration=calib).iloc[0]
    asked, le, zero = brute(weights, 0.5, norms)
    assert row.asked == pytest.approx(asked) and row.at_or_below == pytest.approx(le)
    assert row.reached == pytest.approx(asked)


def test_bad_input():
    model, _ = grid_model()
    with pytest.raises(ValueError, match="sparsities"):
        sparsity_reached(model, [1.0], ["magnitude"])
    with pytest.raises(ValueError, match="unknown method"):
        sparsity_reached(model, [0.5], ["random"])
    with pytest.raises(ValueError, match="calibration"):
        sparsity_reached(model, [0.5], ["wanda"])


def test_norms_from_the_decoder_alone_equal_the_full_forward_and_can_be_reused():
    from effllm_lib.sparse import SparsifyConfig, input_norms
    from effllm_lib.sparse.sparsify import prune_weights_, wanda_norms

    model, _ = tiny_causal_lm("llama", tokenizer="byte", hidden=64)
    names = hf_targets(model)
    calib = [torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(2))]
    dec = input_norms(model, names, calib)  # decoder only (no lm_head logits)
    full = input_norms(model, names + ["lm_head"], calib)  # lm_head hooked: the whole model runs
    for n in names:
        torch.testing.assert_close(dec[n], full[n], rtol=0, atol=0)
    cfg = SparsifyConfig(sparsity=0.5, method="wanda")
    a, _ = tiny_causal_lm("llama", tokenizer="byte", hidden=64)
    b, _ = tiny_causal_lm("llama", tokenizer="byte", hidden=64)
    prune_weights_(a, cfg, calibration=calib)
    prune_weights_(b, cfg, norms=wanda_norms(b, names, cfg, calibration=calib))
    for n in names:
        assert torch.equal(a.get_submodule(n).weight, b.get_submodule(n).weight)
    with pytest.raises(ValueError, match="norms must cover"):
        prune_weights_(b, cfg, norms={names[0]: dec[names[0]]})


def test_layer_stride_counts_a_sample_of_layers():
    model, _ = grid_model()
    names = hf_targets(model)
    kept = [n for n in names if ".layers.0." in n]  # 2 layers, stride 2: layer 0 only
    row = sparsity_reached(model, [0.5], ["magnitude"], layer_stride=2).iloc[0]
    asked, le, zero = brute({n: model.get_submodule(n).weight.detach() for n in kept}, 0.5)
    assert row.linears == len(kept) == len(names) // 2
    assert row.weights == sum(model.get_submodule(n).weight.numel() for n in kept)
    assert row.at_or_below == pytest.approx(le) and row.zero_before == pytest.approx(zero)
    with pytest.raises(ValueError, match="layer_stride"):
        sparsity_reached(model, [0.5], ["magnitude"], layer_stride=0)
