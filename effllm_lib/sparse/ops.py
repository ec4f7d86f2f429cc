"""The kernels as ``torch.library`` ops (``torch.ops.effllm_sparse.*``, defined in kernels/bindings.cpp), with
fake kernels so ``torch.compile`` traces a model through them instead of breaking the graph at every linear.

* ``spmm_bf16(x, bitmaps, values, strip_offsets, n, bias, kernel) -> bf16 [..., n]``
* ``spmm_bf16_act_mul(x, bitmaps, values, strip_offsets, n_out, kernel, act) -> bf16 [..., n_out]``:
  ``act(gate) * up`` from one weight whose strips alternate gate / up (``interleave_gate_up``).
* ``densify_bf16(bitmaps, values, strip_offsets, n, k) -> bf16 [n, k]``: the prefill path's dense weight.
* ``sparse_kv_attention(q, k_bitmaps, k_values, k_offsets, v_bitmaps, v_values, v_offsets, k_tail, v_tail,
  seq_len, scale, kernel) -> float32 [query_heads, head_dim]``: decode attention over a pruned, packed KV
  cache plus a dense tail (``kv_cache``; kernel codes ``kv_cache.KV_KERNEL_CODES``).

``kernel`` is a code (``KERNEL_CODES``); the ops check shapes and dtypes only, in O(1): the weight is
validated once, when it is packed or loaded (``format.validate_packed``).
"""

from __future__ import annotations

import threading

import torch

from ._build import load_extension

KERNEL_CODES = {"portable": 0, "avx512": 1, "amx": 2}
ACT_CODES = {"silu": 0, "gelu_pytorch_tanh": 1}

_lock = threading.Lock()
_ops = None


def _register_fakes() -> None:
    lib = "effllm_sparse"

    @torch.library.register_fake(f"{lib}::spmm_bf16")
    def _(x, bitmaps, values, strip_offsets, n, bias, kernel):
        return x.new_empty((*x.shape[:-1], n), dtype=torch.bfloat16)

    @torch.library.register_fake(f"{lib}::spmm_bf16_act_mul")
    def _(x, bitmaps, values, strip_offsets, n_out, kernel, act):
        return x.new_empty((*x.shape[:-1], n_out), dtype=torch.bfloat16)

    @torch.library.register_fake(f"{lib}::densify_bf16")
    def _(bitmaps, values, strip_offsets, n, k):
        return values.new_empty((n, k), dtype=torch.bfloat16)

    @torch.library.register_fake(f"{lib}::sparse_kv_attention")
    def _(q, k_bitmaps, k_values, k_offsets, v_bitmaps, v_values, v_offsets, k_tail, v_tail, seq_len, scale, kernel):
        return q.new_empty(q.shape, dtype=torch.float32)


def sparse_ops():
    """``torch.ops.effllm_sparse`` (builds and loads the extension, registers the fake kernels once)."""
    global _ops
    if _ops is not None:
        return _ops
    with _lock:
        if _ops is None:
            load_extension()
            _register_fakes()
            _ops = torch.ops.effllm_sparse
    return _ops
