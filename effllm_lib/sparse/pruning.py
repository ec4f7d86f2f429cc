"""Unstructured pruning: magnitude (per layer or per output row) and Wanda.

Thresholds come from ``torch.kthvalue`` (a selection, not a sort). The packaged models' weights shipped 4-bit
(Q4_1 / Q4_K_M), so a block of 32 weights holds at most 16 distinct values and weights can share the
threshold's magnitude; zeroing every weight <= the threshold would then prune more than asked. Here exactly
``round(sparsity * count)`` are zeroed, the tied ones in index order (``_drop_lowest``). How many tie in the
real models is measured by ``quality.sparsity_reached`` (per-block scales make ties across a layer rare in
SmolLM2's Q4_1: see data/results/sparamx/pruning_sparsity_reached.csv).

Wanda (Sun et al., 2023) scores weight ``W[i, j]`` by ``|W[i, j]| * ||X_j||_2``, the L2 norm of input
channel ``j``'s activations over calibration tokens, and prunes the lowest scores of each output row. The
norms come from one forward pass of the dense model over calibration text (``input_norms``); the original
re-runs each decoder layer on the outputs of the already-pruned layers before it (sequential), which costs
one pass per layer: the one-pass variant is what is implemented here.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


def _check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")


def _drop_lowest(score: torch.Tensor, drop: int) -> torch.Tensor:
    """Boolean mask [R, C] of the ``drop`` lowest scores of each row (exactly ``drop``; ties in index order)."""
    if drop <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    thr = score.kthvalue(drop, dim=1, keepdim=True).values
    below = score < thr
    need = drop - below.sum(1, keepdim=True)
    tied = score == thr
    return below | (tied & (tied.cumsum(1) <= need))


def prune_magnitude(weight: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """A copy of ``weight`` with the ``sparsity`` fraction of smallest-magnitude weights zeroed (of the whole
    layer, or of each output row with ``per_row``)."""
    _check_sparsity(sparsity)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    w = weight.detach().clone()
    score = w.abs().float()
    if per_row:
        mask = _drop_lowest(score, int(round(sparsity * w.shape[1])))
    else:
        mask = _drop_lowest(score.reshape(1, -1), int(round(sparsity * w.numel()))).reshape(w.shape)
    return w.masked_fill_(mask, 0)


def prune_wanda(weight: torch.Tensor, input_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of ``weight`` [out, in] with the ``sparsity`` fraction of each output row zeroed, lowest
    ``|W| * input_norm`` first (``input_norm`` [in]: the L2 norm of each input channel's activations)."""
    _check_sparsity(sparsity)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input_norm must have shape ({weight.shape[1]},), got {tuple(input_norm.shape)}")
    if not torch.isfinite(input_norm).all():
        raise ValueError("input_norm has non-finite entries: the calibration activations overflowed")
    w = weight.detach().clone()
    score = w.abs().float() * input_norm.float()[None, :]
    return w.masked_fill_(_drop_lowest(score, int(round(sparsity * w.shape[1]))), 0)


@torch.no_grad()
def input_norms(model: nn.Module, names: Iterable[str], batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` over all calibration tokens for the input of each named ``nn.Linear`` (float64 sums of
    squares, so long calibration runs do not lose the small channels)."""
    names = list(names)
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        return fn

    for name in names:
        if name not in modules:
            raise ValueError(f"no module named {name!r} in the model")
        hooks.append(modules[name].register_forward_pre_hook(hook(name)))
    # an HF causal LM whose hooked linears all sit in its decoder runs the decoder alone: the lm_head's logits
    # (Gemma-3's 262k-token vocabulary: more work than its 18 layers) are not needed for the norms
    decoder = getattr(model, "model", None) if _takes_input_ids(model) else None
    run = decoder if decoder is not None and all(n.startswith("model.") for n in names) else model
    try:
        seen = 0
        for ids in batches:
            run(input_ids=ids) if _takes_input_ids(model) else model(ids)
            seen += 1
        if not seen:
            raise ValueError("no calibration batches given")
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt().float() for name, s in sums.items()}


def _takes_input_ids(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "get_input_embeddings")


def calibration_batches(tokenizer, text: str | None = None, windows: int = 16, seq_len: int = 256,
                        bos: bool = False) -> list[torch.Tensor]:
    """``windows`` windows of ``seq_len`` tokens ([1, seq_len] each) spread evenly over ``text`` (default: the
    packaged Wikipedia slice, ``assets.wikipedia_text("ci")``); ``bos`` starts each window with BOS."""
    if text is None:
        from ..assets import wikipedia_text

        text = wikipedia_text("ci")
    if windows < 1 or seq_len < 2:
        raise ValueError(f"need windows >= 1 and seq_len >= 2, got {windows}, {seq_len}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    body = seq_len - 1 if bos else seq_len
    if ids.numel() < body:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {body}")
    starts = torch.linspace(0, ids.numel() - body, windows).long().unique()
    out = []
    for s in starts.tolist():
        w = ids[s: s + body]
        if bos:
            w = torch.cat([torch.tensor([tokenizer.bos_token_id]), w])
        out.append(w[None])
    return out
