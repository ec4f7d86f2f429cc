"""The C per-group search (bitmod.group_search) against the torch search it replaces (quantize._search)."""

import pytest
import torch

from effllm_lib.bitmod import group_search
from effllm_lib.bitmod.quantize import CLIP_RATIOS, NF4, quantize_tensor

pytestmark = pytest.mark.skipif(not group_search.available(), reason="no C compiler for the group search")

CASES = [("bitmod", 3), ("bitmod", 4), ("ant", 3), ("ant", 4), ("nf4", 4), ("int_asym", 3), ("int_asym", 4),
         ("int", 4), ("fp", 3), ("er", 3)]


def _weights(seed=0, rows=48, cols=384):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[::7, ::13] *= 8  # outliers, so types and clipping ratios differ between groups
    w[3, :128] = 0.0  # an all-zero group
    return w


def _group_err(q, w, g=128, weight=None):
    d = (q.double() - w.double()).pow(2).view(w.shape[0], -1, g)
    if weight is not None:
        d = d * weight.double().view(1, -1, g)
    return d.sum(-1)


@pytest.mark.parametrize("dtype,bits", CASES)
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_c_search_matches_torch_search(dtype, bits, clip, weighted):
    w = _weights()
    cw = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) if weighted else None
    ref = quantize_tensor(w, bits, dtype, clip=clip, col_weight=cw, search="torch")
    fast = quantize_tensor(w, bits, dtype, clip=clip, col_weight=cw, search="auto")
    same = (fast.weight == ref.weight).view(w.shape[0], -1, 128).all(-1)
    # the same choice in every group except possible float32 near-ties, where the C error (summed in double)
    # must then be no worse than the torch choice's
    assert same.float().mean() >= 0.99
    e_fast, e_ref = _group_err(fast.weight, w, weight=cw), _group_err(ref.weight, w, weight=cw)
    assert bool((e_fast[~same] <= e_ref[~same] * (1 + 1e-5)).all())
    if ref.type_ids is not None:
        assert bool((fast.type_ids == ref.type_ids)[same].all())


def test_clip_search_is_optimal_over_the_grid():
    # brute force: every ratio of CLIP_RATIOS quantized alone; the search's group error is the minimum
    w = _weights(seed=2)
    fast = quantize_tensor(w, 4, "nf4", clip=True)
    per_ratio = torch.stack([_group_err(group_search.absmax_search(w.view(48, -1, 128),
                                                                   [NF4.tensor()],
                                                                   [r])[0].view_as(w), w)
                             for r in CLIP_RATIOS])
    assert torch.allclose(_group_err(fast.weight, w), per_ratio.min(0).values, rtol=1e-9, atol=0)


def test_bad_input_is_an_error():
    with pytest.raises(ValueError, match="float32 CPU"):
        group_search.absmax_search(torch.zeros(4, 128), [torch.tensor([-1.0, 1.0])], [1.0])
    with pytest.raises(ValueError, match="sorted"):
        group_search.absmax_search(torch.zeros(1, 4, 128), [torch.tensor([1.0, -1.0])], [1.0])
    with pytest.raises(ValueError, match="ratios"):
        group_search.int_asym_search(torch.zeros(1, 4, 128), 4, [1.5])
    with pytest.raises(ValueError, match="search must be"):
        quantize_tensor(torch.zeros(4, 128), 4, "bitmod", search="numba")
