"""``SparseLinear``: an ``nn.Linear`` whose weight is kept in the compressed format and multiplied by the
sparse kernels, and ``sparse_linear(x, weight)``, the functional form of part 1 (it re-checks the weight on
every call and calls the extension through pybind; the module calls the ``torch.library`` op instead).

    layer = SparseLinear.from_linear(linear, kernel="auto")   # or "portable" / "avx512" / "amx"

The compressed weight lives in registered buffers (``bitmaps``, ``values``, ``strip_offsets``, int8 also
``scales``; ``bias`` float32), so ``state_dict()`` carries it and ``load_state_dict`` takes a weight with any
number of nonzeros (the values buffer is resized) after validating it. bf16 weights run through
``torch.ops.effllm_sparse.spmm_bf16`` (one dispatcher call; ``kernel="auto"`` picks per token count from the
measured calibration, ``autotune``), with ``dense`` = decompress once and torch's GEMM where the calibration
found that faster (many tokens: prefill). int8 weights (per-row scale, per-token dynamic activation scale)
run through ``sparse_linear``. Outputs are bf16, cast back to the input's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._build import load_extension
from .autotune import auto_kernel
from .cpu_features import resolve_kernel
from .ops import KERNEL_CODES, sparse_ops as _OPS
from .format import (STRIP, SparseBF16Weight, SparseInt8Weight, pack_bf16, pack_dense_bf16_vnni, pack_int8,
                     quantize_tokens_int8, validate_packed)
from .pruning import prune_magnitude


# ---------------------------------------------------------------------------------------------- functional
def _pad_input(x2: torch.Tensor, k_pad: int, kernel: str) -> torch.Tensor:
    """Pad K to the tile depth; for AMX with more than 16 tokens also pad the tokens to a multiple of 16."""
    m, k = x2.shape
    m_pad = (m + 15) // 16 * 16 if (kernel == "amx" and m > 16) else m
    if k != k_pad or m != m_pad:
        x2 = F.pad(x2, (0, k_pad - k, 0, m_pad - m))
    return x2.contiguous()


def _raise_on_error(message: str) -> None:
    """The extension returns its argument errors as a string (no C++ exception crosses into Python)."""
    if message:
        raise RuntimeError(f"sparse kernel refused its arguments: {message}")


def sparse_linear(x: torch.Tensor, weight: SparseBF16Weight | SparseInt8Weight, bias: torch.Tensor | None = None,
                  kernel: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` compressed; ``x`` is ``[..., in_features]``; returns bf16 ``[..., out]``.

    ``out`` (bf16, ``[tokens, out_features]`` contiguous rows) is written in place when given.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type != "cpu":
        raise ValueError(f"x must be on the CPU, got {x.device}")
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = "
                         f"{weight.in_features}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be floating point, got {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features)
    m, n = x2.shape[0], weight.out_features
    is_int8 = isinstance(weight, SparseInt8Weight)
    kernel = resolve_kernel(kernel, "int8" if is_int8 else "bf16", tokens=m)
    if out is None:
        out = torch.empty(m, n, dtype=torch.bfloat16)
    elif out.shape != (m, n) or out.dtype != torch.bfloat16 or out.stride(-1) != 1:
        raise ValueError(f"out must be bf16 [{m}, {n}] with contiguous rows, got {out.dtype} {tuple(out.shape)}")
    b = None if bias is None else bias.detach().float().contiguous()
    if b is not None and b.shape != (n,):
        raise ValueError(f"bias must have shape ({n},), got {tuple(b.shape)}")
    validate_packed(weight)
    ext = load_extension()
    if is_int8:
        xq, x_scale = quantize_tokens_int8(x2)
        xq = _pad_input(xq, weight.padded_shape[1], kernel)
        _raise_on_error(ext.spmm_int8(xq, x_scale.contiguous(), weight.bitmaps, weight.values,
                                      weight.strip_offsets, weight.scales, n, b, out, kernel))
    else:
        xb = _pad_input(x2.to(torch.bfloat16), weight.padded_shape[1], kernel)
        _raise_on_error(ext.spmm_bf16(xb, weight.bitmaps, weight.values, weight.strip_offsets, n, b, out, kernel))
    return out.reshape(*lead, n)


def dense_linear_amx(x: torch.Tensor, packed: torch.Tensor, out_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """The dense AMX bf16 baseline on a ``pack_dense_bf16_vnni`` weight (needs an AMX CPU)."""
    resolve_kernel("amx", "bf16")
    x2 = x.reshape(-1, x.shape[-1])
    xb = _pad_input(x2.to(torch.bfloat16), packed.shape[1] * 32, "amx")
    out = torch.empty(x2.shape[0], out_features, dtype=torch.bfloat16)
    b = None if bias is None else bias.detach().float().contiguous()
    _raise_on_error(load_extension().dense_bf16_amx(xb, packed, out_features, b, out))
    return out.reshape(*x.shape[:-1], out_features)




# ------------------------------------------------------------------------------------------------- module
_BUFFERS = {"bf16": ("bitmaps", "values", "strip_offsets"), "int8": ("bitmaps", "values", "strip_offsets", "scales")}


class SparseLinear(nn.Module):
    """A linear layer with a compressed (bitmap + packed nonzeros) weight; inference only."""

    def __init__(self, weight: SparseBF16Weight | SparseInt8Weight, bias: torch.Tensor | None = None,
                 kernel: str = "auto"):
        super().__init__()
        if not isinstance(weight, (SparseBF16Weight, SparseInt8Weight)):
            raise TypeError(f"weight must be a SparseBF16Weight or SparseInt8Weight, got {type(weight).__name__}")
        validate_packed(weight)  # once, here: the op trusts the buffers from now on
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.dtype_name = "int8" if isinstance(weight, SparseInt8Weight) else "bf16"
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.kernel = kernel
        self._code = None
        if kernel != "auto":
            resolve_kernel(kernel, self.dtype_name)  # fail now, not at the first forward
            self._code = KERNEL_CODES[kernel]
        for name in _BUFFERS[self.dtype_name]:
            self.register_buffer(name, getattr(weight, name))
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous().clone())

    @property
    def weight(self) -> SparseBF16Weight | SparseInt8Weight:
        """The compressed weight (a view of the buffers)."""
        if self.dtype_name == "bf16":
            return SparseBF16Weight(self.bitmaps, self.values, self.strip_offsets, self.out_features,
                                    self.in_features)
        return SparseInt8Weight(self.bitmaps, self.values, self.strip_offsets, self.scales, self.out_features,
                                self.in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: str = "auto", dtype: str = "bf16") -> "SparseLinear":
        """Compress ``linear.weight`` as it is (zeros are the pruned weights); the result computes the same
        ``F.linear`` up to bf16 rounding (int8: up to the quantization)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        if dtype not in ("bf16", "int8"):
            raise ValueError(f"dtype must be 'bf16' or 'int8', got {dtype!r}")
        w = linear.weight.detach().cpu()
        packed = pack_bf16(w) if dtype == "bf16" else pack_int8(w)
        return cls(packed, linear.bias, kernel)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool = False, kernel: str = "auto",
              dtype: str = "bf16") -> "SparseLinear":
        """An all-zero layer of this shape: a placeholder that ``load_state_dict`` fills."""
        w = torch.zeros(out_features, in_features)
        packed = pack_bf16(w) if dtype == "bf16" else pack_int8(w)
        return cls(packed, torch.zeros(out_features) if bias else None, kernel)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # the number of nonzeros (values' length) differs from the placeholder's: take the incoming shapes,
        # then validate the incoming weight once, as at pack time
        incoming = {name: state_dict.get(prefix + name) for name in _BUFFERS[self.dtype_name]}
        if all(isinstance(t, torch.Tensor) for t in incoming.values()):
            cls = SparseBF16Weight if self.dtype_name == "bf16" else SparseInt8Weight
            extra = {"scales": incoming["scales"]} if self.dtype_name == "int8" else {}
            w = cls(incoming["bitmaps"], incoming["values"], incoming["strip_offsets"], **extra,
                    out_features=self.out_features, in_features=self.in_features)
            try:
                validate_packed(w)
            except (RuntimeError, TypeError) as exc:
                error_msgs.append(f"{prefix or 'SparseLinear '}: {exc}")
                return
            for name, t in incoming.items():
                if self._buffers[name].shape != t.shape:
                    self._buffers[name] = torch.empty_like(t)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def kernel_for(self, tokens: int) -> str:
        """The kernel a call with ``tokens`` rows runs ("dense" = decompress + torch GEMM)."""
        if self.kernel != "auto":
            return self.kernel
        return auto_kernel(tokens) if self.dtype_name == "bf16" else resolve_kernel("auto", "int8")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype_name != "bf16":
            y = sparse_linear(x, self.weight, self.bias, self.kernel)
            return y if x.dtype == torch.bfloat16 else y.to(x.dtype)
        code = self._code
        if code is None:
            name = auto_kernel(x.numel() // self.in_features)
            if name == "dense":
                return self.dense_forward(x)
            code = KERNEL_CODES[name]
        y = _OPS().spmm_bf16(x, self.bitmaps, self.values, self.strip_offsets, self.out_features, self.bias, code)
        return y if x.dtype == torch.bfloat16 else y.to(x.dtype)

    def dense_weight(self) -> torch.Tensor:
        """The bf16 weight [out, in], decompressed by the extension on all threads."""
        return _OPS().densify_bf16(self.bitmaps, self.values, self.strip_offsets, self.out_features,
                                   self.in_features)

    def dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prefill path: decompress once, then torch's bf16 GEMM (many tokens share one decompression)."""
        b = None if self.bias is None else self.bias.to(torch.bfloat16)
        y = F.linear(x.to(torch.bfloat16), self.dense_weight(), b)
        return y if x.dtype == torch.bfloat16 else y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype_name}, "
                f"nnz={self.weight.nnz}, kernel={self.kernel}")


def weight_bytes(weight: SparseBF16Weight | SparseInt8Weight) -> int:
    """Bytes of weight data a kernel streams from memory for one pass."""
    return weight.nbytes()


__all__ = ["SparseLinear", "sparse_linear", "dense_linear_amx", "pack_dense_bf16_vnni", "STRIP", "prune_magnitude"]
