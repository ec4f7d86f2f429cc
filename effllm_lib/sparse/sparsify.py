"""``sparsify_(model, SparsifyConfig(sparsity=0.5, method="wanda"), tokenizer=tok)``: prune a model's linears
and swap in the sparse kernels, in place.

On the HF Llama, Qwen2 and Gemma3 (text) architectures every linear of the decoder layers is pruned (q, k, v,
o, gate, up, down; the paper's set) and packed for a decode path with one op call per fused group:

* q/k/v are packed as one weight (``FusedSparseLinear``): ``q_proj`` computes all three outputs in one call
  and ``k_proj`` / ``v_proj`` (``LinearSlice``) return their slices of it. The attention code of each
  architecture stays as transformers wrote it.
* gate/up are packed as one weight whose 16-row strips alternate gate / up, and the MLP becomes
  ``SparseGatedMLP``: ``down(act(gate) * up)`` with ``act(gate) * up`` computed inside the same op as the
  product (SiLU for Llama / Qwen2, tanh-GELU for Gemma3).

``lm_head`` and the embeddings stay dense. Any other ``nn.Module`` (no HF config) gets every ``nn.Linear``
but ``lm_head`` swapped one by one, unfused. Everything is pruned and packed before the first module is
replaced, so an error (unsupported architecture, a layer that cannot be converted, a kernel the CPU/OS
denies) leaves the model untouched.

The sparse weights are buffers: ``torch.save(model.state_dict())`` after ``sparsify_`` and
``load_sparse_state_dict_(fresh_model, state_dict, config)`` on a model built from the same config restore
it (the fused structure is rebuilt with empty placeholders, then filled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .autotune import auto_kernel
from .cpu_features import resolve_kernel
from .format import pack_bf16_fast, pack_int8
from .ops import ACT_CODES, KERNEL_CODES, sparse_ops
from .pruning import calibration_batches, input_norms, prune_magnitude, prune_wanda
from .sparse_linear import SparseLinear

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3_text")
METHODS = ("magnitude", "magnitude_row", "wanda", "none")


@dataclass(frozen=True)
class SparsifyConfig:
    """How ``sparsify_`` prunes and packs.

    method: "magnitude" (smallest |W| of each layer), "magnitude_row" (of each output row), "wanda"
    (|W| x input-channel activation norm, per output row; needs calibration text), "none" (keep the zeros the
    weights already have). kernel: "auto" (measured per machine, ``autotune``) or "portable" / "avx512" /
    "amx". fuse: pack q/k/v and gate/up as one weight each (HF architectures).
    """

    sparsity: float = 0.5
    method: str = "magnitude"
    dtype: str = "bf16"
    kernel: str = "auto"
    fuse: bool = True
    calibration_windows: int = 16
    calibration_len: int = 256

    def __post_init__(self):
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.method not in METHODS:
            raise ValueError(f"unknown pruning method {self.method!r}; expected one of {', '.join(METHODS)} "
                             "('none' keeps the zeros the weight already has)")
        if self.dtype not in ("bf16", "int8"):
            raise ValueError(f"dtype must be 'bf16' or 'int8', got {self.dtype!r}")
        if self.fuse and self.dtype != "bf16":
            object.__setattr__(self, "fuse", False)  # the fused ops are bf16 only


SparsityConfig = SparsifyConfig  # part 1's name


# ------------------------------------------------------------------------------------------ fused modules
class FusedSparseLinear(SparseLinear):
    """Several linears of the same input packed as one weight (q/k/v); ``forward`` returns the first part.

    ``outputs(x)`` computes all parts once per input tensor and keeps them until the last ``LinearSlice``
    has taken its part, so q, k and v cost one op call."""

    def __init__(self, weight, bias, splits: tuple[int, ...], kernel: str = "auto"):
        super().__init__(weight, bias, kernel)
        if sum(splits) != self.out_features:
            raise ValueError(f"splits {splits} do not add up to out_features {self.out_features}")
        self.splits = tuple(int(s) for s in splits)
        self._stash: tuple | None = None

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        stash = self._stash
        if stash is not None and stash[0] is x:
            return stash[1]
        parts = super().forward(x).split(self.splits, dim=-1)
        self._stash = (x, parts)
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + f", splits={self.splits}"


class LinearSlice(nn.Module):
    """Part ``index`` of a ``FusedSparseLinear``'s output (k_proj, v_proj); holds no weight of its own."""

    def __init__(self, owner: FusedSparseLinear, index: int):
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the weight is saved once, under the owner
        self.index = index
        self.in_features, self.out_features = owner.in_features, owner.splits[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._owner.outputs(x)
        if self.index == len(parts) - 1:
            self._owner._stash = None  # the last consumer: free the input and outputs
        return parts[self.index]

    def extra_repr(self) -> str:
        return f"part {self.index} of the fused projection, out_features={self.out_features}"


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[I, K] gate and up -> [2I, K] whose 16-row strips alternate gate, up (the act_mul op's order)."""
    i, k = gate.shape
    if up.shape != gate.shape or i % 16:
        raise ValueError(f"gate and up must have the same shape with rows a multiple of 16, got "
                         f"{tuple(gate.shape)} and {tuple(up.shape)}")
    return torch.stack([gate.reshape(i // 16, 16, k), up.reshape(i // 16, 16, k)], 1).reshape(2 * i, k)


class SparseGatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate/up as one interleaved sparse weight and ``act * mul`` in the op."""

    def __init__(self, gate_up: SparseLinear, down_proj: SparseLinear, act: str):
        super().__init__()
        if act not in ACT_CODES:
            raise ValueError(f"activation {act!r} is not fused; supported: {', '.join(ACT_CODES)}")
        if gate_up.out_features % 32:
            raise ValueError(f"gate_up has {gate_up.out_features} rows; the fused op needs a multiple of 32")
        self.gate_up, self.down_proj = gate_up, down_proj
        self.act, self.intermediate = act, gate_up.out_features // 2
        self._act_code = ACT_CODES[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_up
        code = g._code
        if code is None:
            name = auto_kernel(x.numel() // g.in_features)
            if name == "dense":  # many tokens: one decompression, torch's GEMM, de-interleave
                y = g.dense_forward(x.to(torch.bfloat16))
                y = y.reshape(*y.shape[:-1], self.intermediate // 16, 2, 16)
                gate, up = y[..., 0, :], y[..., 1, :]
                act = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
                return self.down_proj((act * up).reshape(*x.shape[:-1], self.intermediate)).to(x.dtype)
            code = KERNEL_CODES[name]
        h = sparse_ops().spmm_bf16_act_mul(x, g.bitmaps, g.values, g.strip_offsets, self.intermediate, code,
                                           self._act_code)
        y = self.down_proj(h)
        return y if x.dtype == y.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"act={self.act}, intermediate={self.intermediate}"


# ------------------------------------------------------------------------------------------------ sparsify_
def _arch(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) if config is not None else None


def _hidden_act(model: nn.Module) -> str:
    c = model.config
    return getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)


def _decoder_layers(model: nn.Module):
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers; sparsify_ knows the "
                         f"HF layout of {', '.join(SUPPORTED_ARCHS)}")
    return layers


ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def _check_linear(name: str, mod: nn.Module) -> nn.Linear:
    if not isinstance(mod, nn.Linear):
        raise ValueError(f"layer {name} is a {type(mod).__name__}, not an nn.Linear: sparsify_ cannot convert it "
                         "(already sparse, quantized, or a different layer type)")
    w = mod.weight
    if w.device.type != "cpu":
        raise ValueError(f"layer {name} is on {w.device}; the sparse kernels run on the CPU (move the model first)")
    if not w.dtype.is_floating_point:
        raise ValueError(f"layer {name} has a {w.dtype} weight; sparsify_ needs floating-point weights")
    return mod


def hf_targets(model: nn.Module) -> list[str]:
    """Names of the linears ``sparsify_`` prunes in an HF model (checked: every one is a CPU float nn.Linear)."""
    arch = _arch(model)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r} ({type(model).__name__}): sparsify_ knows the decoder "
                         f"layout of {', '.join(SUPPORTED_ARCHS)} (q/k/v/o and gate/up/down linears, a gated MLP)")
    names = []
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    for i, layer in enumerate(_decoder_layers(model)):
        for group, projs in (("self_attn", ATTN_PROJ), ("mlp", MLP_PROJ)):
            block = getattr(layer, group, None)
            if block is None:
                raise ValueError(f"layer {prefix}.{i} has no {group}: not the {arch} layout sparsify_ knows")
            for p in projs:
                name = f"{prefix}.{i}.{group}.{p}"
                if not hasattr(block, p):
                    raise ValueError(f"{name} is missing: not the {arch} layout sparsify_ knows")
                _check_linear(name, getattr(block, p))
                names.append(name)
    return names


def _pack(w: torch.Tensor, dtype: str):
    return pack_bf16_fast(w) if dtype == "bf16" else pack_int8(w)


def wanda_norms(model, names, config, tokenizer=None, calibration=None) -> dict[str, torch.Tensor]:
    """Wanda's input-channel activation norms of the linears ``names``, from ``calibration`` (input_ids
    tensors) or, with ``tokenizer``, from ``config.calibration_windows`` windows of the packaged Wikipedia slice."""
    if calibration is None:
        if tokenizer is None:
            raise ValueError("method='wanda' needs calibration activations: pass tokenizer= (the packaged "
                             "Wikipedia text is used) or calibration=[input_ids, ...]")
        bos = _arch(model) == "gemma3_text"  # Gemma needs <bos> at the start of every window
        calibration = calibration_batches(tokenizer, windows=config.calibration_windows,
                                          seq_len=config.calibration_len, bos=bos)
    return input_norms(model, names, calibration)


def _pruner(model, names, config, tokenizer, calibration, norms=None) -> Callable[[str], torch.Tensor]:
    """A function name -> pruned weight, pruning when asked (so only packed weights pile up; the model itself
    is not modified). ``norms``: Wanda's activation norms computed earlier (``wanda_norms``), reused."""
    modules = dict(model.named_modules())
    if config.method == "wanda" and norms is None:
        norms = wanda_norms(model, names, config, tokenizer, calibration)

    def prune(name: str) -> torch.Tensor:
        w = modules[name].weight.detach()
        if config.method == "none":
            return w
        if config.method == "wanda":
            return prune_wanda(w, norms[name], config.sparsity)
        return prune_magnitude(w, config.sparsity, per_row=config.method == "magnitude_row")
    return prune


def _build_hf(model, weights: Callable[[str], torch.Tensor | None], config, empty: bool) -> dict[str, nn.Module]:
    """The replacement modules, by the dotted name they go to (nothing is swapped here)."""
    modules = dict(model.named_modules())
    prefix = "model.layers" if hasattr(model, "model") else "layers"
    act = _hidden_act(model)
    new: dict[str, nn.Module] = {}

    def bias_of(name):
        b = modules[name].bias
        return None if b is None else b.detach().float()

    def single(name):
        lin = modules[name]
        if empty:
            return SparseLinear.empty(lin.out_features, lin.in_features, lin.bias is not None, config.kernel,
                                      config.dtype)
        return SparseLinear(_pack(weights(name), config.dtype), bias_of(name), config.kernel)

    for i in range(len(_decoder_layers(model))):
        a, m = f"{prefix}.{i}.self_attn", f"{prefix}.{i}.mlp"
        q, k, v = (f"{a}.{p}" for p in ("q_proj", "k_proj", "v_proj"))
        if config.fuse:
            lins = [modules[n] for n in (q, k, v)]
            splits = tuple(lin.out_features for lin in lins)
            has_bias = [lin.bias is not None for lin in lins]
            if empty:
                blank = SparseLinear.empty(sum(splits), lins[0].in_features, any(has_bias), config.kernel)
                owner = FusedSparseLinear(blank.weight, blank.bias, splits, config.kernel)
            else:
                w = torch.cat([weights(n) for n in (q, k, v)], 0)
                bias = None
                if any(has_bias):
                    bias = torch.cat([bias_of(n) if bias_of(n) is not None else torch.zeros(s)
                                      for n, s in zip((q, k, v), splits)])
                owner = FusedSparseLinear(_pack(w, "bf16"), bias, splits, config.kernel)
            new[q], new[k], new[v] = owner, LinearSlice(owner, 1), LinearSlice(owner, 2)
        else:
            for n in (q, k, v):
                new[n] = single(n)
        new[f"{a}.o_proj"] = single(f"{a}.o_proj")
        gate, up, down = (f"{m}.{p}" for p in MLP_PROJ)
        inter = modules[gate].out_features
        fusable = (config.fuse and act in ACT_CODES and inter % 16 == 0 and modules[gate].bias is None
                   and modules[up].bias is None)
        if fusable:
            if empty:
                gu = SparseLinear.empty(2 * inter, modules[gate].in_features, False, config.kernel)
            else:
                gu = SparseLinear(_pack(interleave_gate_up(weights(gate), weights(up)), "bf16"), None, config.kernel)
            new[m] = SparseGatedMLP(gu, single(down), act)
        else:
            for n in (gate, up, down):
                new[n] = single(n)
    return new


def _swap(model: nn.Module, new: dict[str, nn.Module]) -> None:
    for name, mod in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, mod)


def _generic_targets(model, filter_fn) -> list[str]:
    if filter_fn is None:
        def filter_fn(mod, name):
            return isinstance(mod, nn.Linear) and name.split(".")[-1] != "lm_head"
    names = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear) and filter_fn(mod, name)]
    for name in names:
        _check_linear(name, model.get_submodule(name))
    return names


def _check_config(config) -> None:
    if not isinstance(config, SparsifyConfig):
        raise TypeError(f"config must be a SparsifyConfig, got {type(config).__name__}")
    if config.kernel != "auto":
        resolve_kernel(config.kernel, config.dtype)  # e.g. AMX where the OS denies the tiles: fail before work


@torch.no_grad()
def sparsify_(model: nn.Module, config: SparsifyConfig = SparsifyConfig(), tokenizer=None,
              calibration: list[torch.Tensor] | None = None,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Prune and pack ``model``'s linears in place (see the module docstring); returns the model.

    ``tokenizer`` (Wanda): calibration windows come from the packaged Wikipedia text; or pass
    ``calibration`` (a list of input_ids tensors). ``filter_fn(module, name)`` selects the linears of a
    non-HF model (default: all but ``lm_head``)."""
    _check_config(config)
    if _arch(model) is not None:
        if filter_fn is not None:
            raise ValueError("filter_fn applies to plain modules; HF models get the paper's set of linears")
        names = hf_targets(model)
        new = _build_hf(model, _pruner(model, names, config, tokenizer, calibration), config, empty=False)
    else:
        names = _generic_targets(model, filter_fn)
        prune = _pruner(model, names, config, tokenizer, calibration)
        new = {n: SparseLinear(_pack(prune(n), config.dtype), model.get_submodule(n).bias, config.kernel)
               for n in names}
    _swap(model, new)  # only now: every error above left the model as it was
    return model


@torch.no_grad()
def prune_weights_(model: nn.Module, config: SparsifyConfig = SparsifyConfig(), tokenizer=None,
                   calibration: list[torch.Tensor] | None = None,
                   norms: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The pruning of ``sparsify_`` (same layers, same method and scores) written into the model's own float
    weights as zeros, nothing packed: the model computes what the sparse model computes, in its own dtype.
    For measuring quality where the bf16 kernels would be slow (a CPU without AVX512_BF16 multiplies bf16
    about ten times slower than float32) and to separate the cost of pruning from that of bf16 weights.
    ``norms``: Wanda's norms from ``wanda_norms`` on the same (dense) weights, to prune several sparsities
    from one calibration pass."""
    _check_config(config)
    names = hf_targets(model) if _arch(model) is not None else _generic_targets(model, None)
    if norms is not None and set(norms) != set(names):
        raise ValueError(f"norms must cover exactly the pruned linears; missing {sorted(set(names) - set(norms))[:3]}, "
                         f"extra {sorted(set(norms) - set(names))[:3]}")
    prune = _pruner(model, names, config, tokenizer, calibration, norms)
    pruned = {n: prune(n) for n in names}  # all scores from the unpruned model (Wanda's norms come first)
    for n, w in pruned.items():
        model.get_submodule(n).weight.copy_(w)
    return model


@torch.no_grad()
def load_sparse_state_dict_(model: nn.Module, state_dict: dict, config: SparsifyConfig = SparsifyConfig(),
                            strict: bool = True) -> nn.Module:
    """Give a freshly built model (same config) the sparse structure ``sparsify_(model, config)`` made, then
    load ``state_dict`` (saved from the sparsified model) into it."""
    _check_config(config)
    if _arch(model) is not None:
        hf_targets(model)
        new = _build_hf(model, lambda name: None, config, empty=True)
    else:
        new = {n: SparseLinear.empty(model.get_submodule(n).out_features, model.get_submodule(n).in_features,
                                     model.get_submodule(n).bias is not None, config.kernel, config.dtype)
               for n in _generic_targets(model, None)}
    _swap(model, new)
    model.load_state_dict(state_dict, strict=strict)
    return model
