"""SparAMX (chapter ``sparamx``): unstructured-sparse LLM weights on CPUs, bitmap format + C++ kernels.

* ``format``: the compressed tile format (``pack_bf16`` / ``pack_int8`` and exact round trips).
* ``sparse_linear``: ``SparseLinear`` (weight in buffers, calls the op), ``sparse_linear(x, weight)``.
* ``pruning``: magnitude and Wanda (kthvalue thresholds, exact counts under ties), calibration activations.
* ``sparsify``: ``sparsify_(model, SparsifyConfig(...))`` on HF Llama / Qwen2 / Gemma3 (q/k/v and gate/up
  fused, act x mul in the op) or any module; ``load_sparse_state_dict_`` to reload.
* ``ops``: the kernels as ``torch.library`` ops with fake kernels (``torch.compile``).
* ``kv_cache``: sparse KV-cache attention (``prune_kv``, ``pack_kv``, the ``sparse_kv_attention`` op,
  ``SparseKVCache`` + ``enable_sparse_kv_`` for transformers); ``kv_bench``: its speed vs dense.
* ``quality``: perplexity by weight sparsity (``pruning_perplexity``) and the cost of KV pruning.
* ``cpu_features``: what the CPU/OS allow; ``autotune``: ``kernel="auto"`` measured per machine, cached.
* ``decode_bench``: end-to-end decode latency (prefill, N steps, per-token median), byte ceilings.
* ``_build``: builds ``kernels/*.cpp`` with torch.utils.cpp_extension on first use, with ``-fopenmp`` (without
  it ATen's ``at::parallel_for`` silently runs on one thread: the first device results, commit 2db80ad, were
  single-threaded kernels and a single-threaded bandwidth probe).
* ``bench``: timing, the multi-threaded DRAM read-bandwidth probe, thread and batch sweeps, limits tables.

The C++ entry points never throw: argument errors come back as a string and ``sparse_linear`` raises them
(after checking the compressed weight in Python first), so no C++ exception crosses into Python.
"""

from .cpu_features import available_kernels, cpu_features, resolve_kernel
from .format import (SparseBF16Weight, SparseInt8Weight, compression_ratio, pack_bf16, pack_bf16_fast, pack_dense_bf16_vnni,
                     pack_int8, quantize_rows_int8, quantize_tokens_int8, unpack_bf16, unpack_int8)
from .pruning import calibration_batches, input_norms, prune_magnitude, prune_wanda
from .sparse_linear import SparseLinear, dense_linear_amx, sparse_linear
from .sparsify import (FusedSparseLinear, LinearSlice, SparseGatedMLP, SparsifyConfig, SparsityConfig,
                       load_sparse_state_dict_, sparsify_)

__all__ = [
    "FusedSparseLinear", "LinearSlice", "SparseGatedMLP", "SparsifyConfig", "calibration_batches", "input_norms",
    "load_sparse_state_dict_", "pack_bf16_fast", "prune_wanda",
    "SparseBF16Weight", "SparseInt8Weight", "SparseLinear", "SparsityConfig", "available_kernels",
    "compression_ratio", "cpu_features", "dense_linear_amx", "pack_bf16", "pack_dense_bf16_vnni", "pack_int8",
    "prune_magnitude", "quantize_rows_int8", "quantize_tokens_int8", "resolve_kernel", "sparse_linear",
    "sparsify_", "unpack_bf16", "unpack_int8", "SparseKVCache", "SparseKVConfig", "enable_sparse_kv_", "pack_kv",
    "prune_kv", "sparse_kv_attention",
]

_KV_NAMES = ("SparseKVCache", "SparseKVConfig", "enable_sparse_kv_", "pack_kv", "prune_kv", "sparse_kv_attention")


def __getattr__(name: str):
    # kv_cache subclasses transformers' cache, and importing transformers is slow and noisy: load it on first use
    if name in _KV_NAMES:
        from . import kv_cache

        return getattr(kv_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
