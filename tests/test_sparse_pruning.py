"""Pruning against brute force (a full sort), including the ties that 4-bit-quantized weights are full of."""

import pytest
import torch
from torch import nn

from effllm_lib.sparse import calibration_batches, input_norms, prune_magnitude, prune_wanda


def brute_force_mask(score: torch.Tensor, drop: int) -> torch.Tensor:
    """Drop the `drop` lowest of each row by a stable sort (ties: lower index first)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    for i, row in enumerate(score):
        order = sorted(range(row.numel()), key=lambda j: (row[j].item(), j))
        mask[i, order[:drop]] = True
    return mask


def quantized_weight(n, k, seed, levels=8):
    """Weights with few distinct magnitudes, like a dequantized 4-bit block: many exact ties."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, (n, k), generator=g).float() * 0.01)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("ties", [False, True])
def test_magnitude_per_layer_and_per_row_match_a_full_sort(sparsity, ties):
    w = quantized_weight(12, 40, 1) if ties else torch.randn(12, 40, generator=torch.Generator().manual_seed(2))
    layer = prune_magnitude(w, sparsity)
    ref = brute_force_mask(w.abs().reshape(1, -1), round(sparsity * w.numel())).reshape(w.shape)
    assert torch.equal(layer == 0, ref | (w == 0))  # exactly the count asked, ties in index order
    assert torch.equal(layer[~ref], w[~ref])  # the kept weights are untouched
    row = prune_magnitude(w, sparsity, per_row=True)
    ref_row = brute_force_mask(w.abs(), round(sparsity * w.shape[1]))
    assert torch.equal(row == 0, ref_row | (w == 0))


def test_ties_do_not_over_prune():
    # 4-bit weights: half of each row shares the smallest magnitude; 50 % must prune exactly half
    w = torch.tensor([[0.1, -0.1, 0.1, 0.1, 0.2, 0.3, -0.1, 0.4]])
    out = prune_magnitude(w, 0.5, per_row=True)
    assert int((out == 0).sum()) == 4
    assert torch.equal(out, torch.tensor([[0, 0, 0, 0, 0.2, 0.3, -0.1, 0.4]]))  # index order among ties


def test_wanda_matches_brute_force_and_differs_from_magnitude():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=g)
    norm = torch.rand(32, generator=g) * 10
    out = prune_wanda(w, norm, 0.5)
    ref = brute_force_mask(w.abs() * norm[None, :], 16)
    assert torch.equal(out == 0, ref)
    assert ((out == 0).sum(1) == 16).all()  # per output row
    assert not torch.equal(out == 0, prune_magnitude(w, 0.5, per_row=True) == 0)


def test_input_norms_hand_computed():
    lin = nn.Linear(3, 2)
    model = nn.Sequential(lin)
    xs = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 0.0, 0.0], [2.0, 1.0, 3.0]])]
    norms = input_norms(model, ["0"], xs)
    assert torch.allclose(norms["0"], torch.tensor([3.0, 5.0 ** 0.5, 3.0]))
    with pytest.raises(ValueError, match="no module"):
        input_norms(model, ["nope"], xs)
    with pytest.raises(ValueError, match="no calibration"):
        input_norms(model, ["0"], [])


def test_calibration_batches_spread_over_the_text():
    from effllm_lib.models import ByteTokenizer

    tok = ByteTokenizer()
    text = "".join(chr(97 + i % 26) for i in range(1000))
    b = calibration_batches(tok, text, windows=4, seq_len=10, bos=True)
    assert len(b) == 4 and all(x.shape == (1, 10) and x[0, 0] == tok.bos_token_id for x in b)
    assert b[0][0, 1] == ord("a") and b[-1][0, -1] == ord(text[-1])
    with pytest.raises(ValueError, match="fewer than one window"):
        calibration_batches(tok, "abc", windows=1, seq_len=10)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match="sparsity"):
        prune_magnitude(torch.randn(4, 4), bad)
    with pytest.raises(ValueError, match="sparsity"):
        prune_wanda(torch.randn(4, 4), torch.ones(4), bad)
