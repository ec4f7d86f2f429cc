"""Activation statistics of calibration text, for calibrated quantization (``BitMoDConfig(calibration=...)``).

    stats = collect_activation_stats(model, windows)      # windows: [n, seq_len] token ids of calibration text
    quantize_(model, BitMoDConfig(dtype="bitmod", bits=3, calibration="awq"), calibration=stats)

For every layer ``quantize_`` would quantize (``nn.Linear`` and transformers' ``Conv1D``) a forward pre-hook
accumulates, per input channel, the mean square (the diagonal of the layer's input Gram matrix: llama.cpp's
importance matrix, used to weight the quantization error) and the mean absolute value (AWQ's activation
scale), and keeps a seeded random sample of input rows (for AWQ's output-error search). Layers that read the
very same tensor in the forward pass (q/k/v of an attention block, gate/up of an MLP) get the same ``group``:
AWQ must give them one scale because it folds the scale into the operation that produced that tensor.

The calibration text must not be the evaluation text (we use Jane Austen's novels against Wikipedia, as GPTQ
and AWQ calibrate on C4 / the Pile and evaluate on WikiText-2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ActStats:
    """One layer's input statistics over ``tokens`` calibration tokens."""

    sq_mean: torch.Tensor  # [in_features] mean of x^2
    abs_mean: torch.Tensor  # [in_features] mean of |x|
    sample: torch.Tensor  # [n, in_features] sampled input rows (shared object among a group's layers)
    group: str  # name of the first layer that reads the same tensor
    tokens: int
    xtx: torch.Tensor | None = None  # [in, in] mean of x x^T (GPTQ's Hessian; shared among a group's layers)


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every ``nn.Linear`` and transformers ``Conv1D`` in ``model``."""
    conv1d = _conv1d_type()
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))]


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


@torch.no_grad()
def collect_activation_stats(model: nn.Module, windows: torch.Tensor, sample_tokens: int = 512, seed: int = 0,
                             progress: bool = False, hessian: bool = False) -> dict[str, ActStats]:
    """Run ``model`` over ``windows`` ([n, seq_len] token ids) and return each quantizable layer's ``ActStats``.

    ``sample_tokens`` input rows per layer are kept (spread evenly over the windows, seeded random positions).
    ``hessian``: also accumulate the full input Gram matrix E[x x^T] (GPTQ's Hessian; in_features^2 floats per
    distinct input tensor, accumulated in float64).
    """
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be a [n, seq_len] tensor of token ids, got {getattr(windows, 'shape', windows)}")
    if sample_tokens < 1:
        raise ValueError(f"sample_tokens must be positive, got {sample_tokens}")
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("the model has no nn.Linear / Conv1D layers to calibrate")
    n_win, seq = windows.shape
    per_window = min(seq, math.ceil(sample_tokens / n_win))
    gen = torch.Generator().manual_seed(seed)
    positions = [torch.randperm(seq, generator=gen)[:per_window].sort().values for _ in range(n_win)]
    sums = {}
    state = {"last": None, "last_name": None, "window": 0}
    group: dict[str, str] = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            if name not in group:  # first window: layers fed the very same tensor object form a group
                group[name] = state["last_name"] if x is state["last"] else name
                state["last"], state["last_name"] = x, group[name]
            flat = x.reshape(-1, x.shape[-1]).float()
            acc = sums.setdefault(name, {"sq": torch.zeros(flat.shape[1], dtype=torch.float64, device=x.device),
                                         "abs": torch.zeros(flat.shape[1], dtype=torch.float64, device=x.device),
                                         "n": 0, "rows": []})
            acc["sq"] += flat.pow(2).sum(0, dtype=torch.float64)
            acc["abs"] += flat.abs().sum(0, dtype=torch.float64)
            acc["n"] += flat.shape[0]
            if hessian and group[name] == name:
                acc.setdefault("xtx", torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=x.device))
                acc["xtx"] += (flat.t() @ flat).double()
            if group[name] == name:  # group members share the leader's sample
                pos = positions[state["window"]].to(x.device)
                acc["rows"].append(x.reshape(-1, seq, x.shape[-1])[:, pos].reshape(-1, x.shape[-1]).float())
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    device = next(model.parameters()).device
    from tqdm.auto import tqdm

    try:
        model.eval()
        for i in tqdm(range(n_win), desc="calibration", disable=not progress, leave=False):
            state["window"], state["last"], state["last_name"] = i, None, None
            model(input_ids=windows[i:i + 1].to(device))
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, _ in layers if n not in sums]
    out = {}
    samples = {n: torch.cat(a["rows"]) for n, a in sums.items() if a["rows"]}
    xtx = {n: (a["xtx"] / a["n"]).float() for n, a in sums.items() if "xtx" in a}
    for name, _ in layers:
        if name in missing:
            continue
        a = sums[name]
        out[name] = ActStats(sq_mean=(a["sq"] / a["n"]).float(), abs_mean=(a["abs"] / a["n"]).float(),
                             sample=samples[group[name]], group=group[name], tokens=a["n"],
                             xtx=xtx.get(group[name]))
    return out
