"""Sparse KV-cache attention (SparAMX's KV sparsity): prune K and V at prefill, attend over them compressed.

    enable_sparse_kv_(model)                                   # once: registers the attention function
    cache = SparseKVCache(model.config, SparseKVConfig(sparsity=0.5))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=32)

The paper's scheme (SparAMX ``custom_llama_attention.py``): after the prompt's K and V of a layer are computed,
the smallest-magnitude fraction ``sparsity`` of each is zeroed with one threshold over the whole layer (all
heads, positions and dims: ``prune_kv``), K [S, D] and V^T [D, S] of every KV head go into the compressed bf16
tile format of the weights (``pack_kv``), and each decode step computes QK^T and PV with the sparse kernel, all
heads of a layer in one op call (``torch.ops.effllm_sparse.sparse_kv_attention``). Tokens decoded later go to a
dense tail that the same call attends to. The prompt's own attention (prefill) uses the unpruned K and V: the
pruning only changes what the cache keeps for decoding.

Plugged into transformers through its attention interface and a ``Cache`` of ours: ``SparseKVCache`` is a
``DynamicCache`` whose full-attention layers are ``SparseKVLayer`` (sliding-window layers, as in Gemma 3, stay
dense). At a decode step the layer returns its dense tail tagged with itself; the registered attention function
("effllm_sparse_kv") sees the tag and calls the op, and runs transformers' SDPA for everything else (prefill,
untagged layers). Batch 1 only, like the paper's decode measurements (a clear error otherwise).

Kernels: "avx512" (expand-loads, AVX512F/BW/VL/VBMI2), "avx2" (byte-shuffle expansion, AVX2 + FMA), "portable";
"auto" takes the widest one the CPU and OS allow. All accumulate in float32 on the bf16 values widened exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ._build import load_extension
from .format import SparseBF16Weight, _from_tiles, pack_bf16_fast, pack_dense_bf16_vnni, unpack_bf16, validate_packed
from .ops import sparse_ops
from .pruning import _drop_lowest

ATTN_NAME = "effllm_sparse_kv"
KV_KERNELS = ("portable", "avx2", "avx512")  # slowest first
KV_KERNEL_CODES = {"portable": 0, "avx512": 1, "avx2": 3}
KV_LAYOUTS = ("bitmap", "dense")


# ---------------------------------------------------------------------------------------------- kernels
@lru_cache(maxsize=1)
def available_kv_kernels() -> tuple[str, ...]:
    """The KV kernels this CPU and OS can run, slowest first."""
    p = load_extension().cpu_probe()
    ok = {"portable": True, "avx2": p["os_avx"] and p["avx2"] and p["fma"],
          "avx512": p["os_avx512"] and p["avx512f"] and p["avx512bw"] and p["avx512vl"] and p["avx512_vbmi2"]}
    return tuple(k for k in KV_KERNELS if ok[k])


def resolve_kv_kernel(kernel: str = "auto") -> str:
    if kernel != "auto" and kernel not in KV_KERNELS:
        raise ValueError(f"unknown KV kernel {kernel!r}; expected 'auto' or one of {KV_KERNELS}")
    here = available_kv_kernels()
    if kernel == "auto":
        return here[-1]
    if kernel not in here:
        raise RuntimeError(f"KV kernel {kernel!r} cannot run on this CPU/OS; available here: {list(here)}")
    return kernel


@dataclass(frozen=True)
class SparseKVConfig:
    """sparsity: fraction of K (and of V, unless ``value_sparsity`` is given) zeroed at prefill, per layer;
    kernel: "auto" or one of ``KV_KERNELS``; layout: "bitmap" (the compressed format) or "dense" (every value in
    the kernel's tile order, no bitmaps: the same kernel on an unpruned cache, the dense baseline; sparsity 0)."""

    sparsity: float = 0.5
    value_sparsity: float | None = None
    kernel: str = "auto"
    layout: str = "bitmap"

    def __post_init__(self):
        for name in ("sparsity", "value_sparsity"):
            s = getattr(self, name)
            if s is None and name == "value_sparsity":
                continue
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s < 1.0:
                raise ValueError(f"{name} must be in [0, 1) (the fraction of the cache zeroed), got {s!r}")
        if self.kernel != "auto" and self.kernel not in KV_KERNELS:
            raise ValueError(f"unknown KV kernel {self.kernel!r}; expected 'auto' or one of {KV_KERNELS}")
        if self.layout not in KV_LAYOUTS:
            raise ValueError(f"unknown KV layout {self.layout!r}; expected one of {KV_LAYOUTS}")
        if self.layout == "dense" and (self.sparsity or self.v_sparsity):
            raise ValueError(f"the dense layout keeps every entry: sparsity must be 0, got {self.sparsity} "
                             f"(values {self.v_sparsity})")

    @property
    def v_sparsity(self) -> float:
        return self.sparsity if self.value_sparsity is None else self.value_sparsity


# ------------------------------------------------------------------------------------ pruning and format
def prune_kv(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A copy of ``t`` (one layer's K or V, any shape) with exactly ``round(sparsity * numel)`` of its
    smallest-magnitude entries zeroed: one threshold for the whole tensor (``kthvalue``), ties in index order."""
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"KV sparsity must be in [0, 1), got {sparsity!r}")
    drop = int(round(sparsity * t.numel()))
    mask = _drop_lowest(t.detach().abs().float().reshape(1, -1), drop).reshape(t.shape)
    return t.detach().masked_fill(mask, 0)


@dataclass
class PackedKV:
    """One layer's pruned K and V in the compressed bf16 format: K as [kv_heads * Sp, D] (each head's S
    positions padded to Sp = round_up(S, 16) with zero rows), V^T as [kv_heads * D, S]. Layout "dense": the
    same matrices with every value in tile order ([strips, k_tiles, 16, 32] flattened) and empty bitmaps and
    offsets."""

    k_bitmaps: torch.Tensor
    k_values: torch.Tensor
    k_offsets: torch.Tensor
    v_bitmaps: torch.Tensor
    v_values: torch.Tensor
    v_offsets: torch.Tensor
    kv_heads: int
    seq_len: int
    head_dim: int
    layout: str = "bitmap"

    @property
    def padded_len(self) -> int:
        return -(-self.seq_len // 16) * 16

    def _dense(self, values: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        kt = -(-cols // 32)
        return _from_tiles(values.view(rows // 16, kt, 16, 32), 2)[:, :cols]

    def k_weight(self) -> SparseBF16Weight:
        return SparseBF16Weight(self.k_bitmaps, self.k_values, self.k_offsets, self.kv_heads * self.padded_len,
                                self.head_dim)

    def v_weight(self) -> SparseBF16Weight:
        return SparseBF16Weight(self.v_bitmaps, self.v_values, self.v_offsets, self.kv_heads * self.head_dim,
                                self.seq_len)

    def keys(self) -> torch.Tensor:
        """The pruned K back as dense bf16 [kv_heads, S, D] (exact)."""
        rows = self.kv_heads * self.padded_len
        k = (self._dense(self.k_values, rows, self.head_dim) if self.layout == "dense"
             else unpack_bf16(self.k_weight())).reshape(self.kv_heads, self.padded_len, self.head_dim)
        return k[:, : self.seq_len].contiguous()

    def values(self) -> torch.Tensor:
        """The pruned V back as dense bf16 [kv_heads, S, D] (exact)."""
        rows = self.kv_heads * self.head_dim
        vt = (self._dense(self.v_values, rows, self.seq_len) if self.layout == "dense"
              else unpack_bf16(self.v_weight())).reshape(self.kv_heads, self.head_dim, self.seq_len)
        return vt.transpose(1, 2).contiguous()

    def nbytes(self) -> int:
        """Bytes a decode step reads for the pruned part: bitmaps, nonzeros and strip offsets of K and V (dense
        layout: every value, including the zero padding of the tiles)."""
        if self.layout == "dense":
            return (self.k_values.numel() + self.v_values.numel()) * 2
        return self.k_weight().nbytes() + self.v_weight().nbytes()

    @property
    def sparsity(self) -> tuple[float, float]:
        """Fraction of K and of V not stored (0 for the dense layout, which stores every entry)."""
        if self.layout == "dense":
            return 0.0, 0.0
        n = self.kv_heads * self.seq_len * self.head_dim
        return 1 - int(self.k_offsets[-1]) / n, 1 - int(self.v_offsets[-1]) / n


def pack_kv(keys: torch.Tensor, values: torch.Tensor, layout: str = "bitmap") -> PackedKV:
    """Compress one layer's K and V ([kv_heads, S, D] each; zeros are the pruned entries) for the decode op.
    ``layout="dense"``: keep every value in the kernel's tile order, no bitmaps (the dense baseline)."""
    if layout not in KV_LAYOUTS:
        raise ValueError(f"unknown KV layout {layout!r}; expected one of {KV_LAYOUTS}")
    for name, t in (("keys", keys), ("values", values)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating-point [kv_heads, seq_len, head_dim] tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got {t.device}")
    if keys.shape != values.shape:
        raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
    h, s, d = keys.shape
    if s == 0 or h == 0:
        raise ValueError(f"empty KV cache: shape {tuple(keys.shape)}")
    if d % 16:
        raise ValueError(f"head_dim must be a multiple of 16 for the sparse KV kernel, got {d}")
    sp = -(-s // 16) * 16
    k = torch.nn.functional.pad(keys.detach().to(torch.bfloat16), (0, 0, 0, sp - s)).reshape(h * sp, d)
    vt = values.detach().to(torch.bfloat16).transpose(1, 2).reshape(h * d, s)
    if layout == "dense":
        empty_bm, empty_off = torch.empty(0, dtype=torch.int32), torch.empty(0, dtype=torch.int64)
        return PackedKV(empty_bm, pack_dense_bf16_vnni(k).view(-1), empty_off, empty_bm,
                        pack_dense_bf16_vnni(vt).view(-1), empty_off, h, s, d, layout="dense")
    kw, vw = pack_bf16_fast(k.contiguous()), pack_bf16_fast(vt.contiguous())
    validate_packed(kw)
    validate_packed(vw)
    return PackedKV(kw.bitmaps, kw.values, kw.strip_offsets, vw.bitmaps, vw.values, vw.strip_offsets, h, s, d)


def sparse_kv_attention(q: torch.Tensor, packed: PackedKV, k_tail: torch.Tensor | None = None,
                        v_tail: torch.Tensor | None = None, scale: float | None = None,
                        kernel: str = "auto") -> torch.Tensor:
    """softmax(scale * q K^T) V for one decode token over the packed K/V plus the dense tails, all heads:
    q [query_heads, D] (query head i uses KV head i // (query_heads / kv_heads)), tails [kv_heads, T, D]
    (None: no tail). Returns float32 [query_heads, D]."""
    if not isinstance(packed, PackedKV):
        raise TypeError(f"packed must be a PackedKV (pack_kv), got {type(packed).__name__}")
    if not isinstance(q, torch.Tensor) or q.dim() != 2 or q.shape[1] != packed.head_dim:
        raise ValueError(f"q must be [query_heads, {packed.head_dim}], got {getattr(q, 'shape', type(q).__name__)}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q must be floating point, got {q.dtype}")
    if q.shape[0] % packed.kv_heads:
        raise ValueError(f"query heads ({q.shape[0]}) must be a multiple of kv heads ({packed.kv_heads})")
    if (k_tail is None) != (v_tail is None):
        raise ValueError("give both k_tail and v_tail, or neither")
    if k_tail is None:
        k_tail = v_tail = torch.zeros(packed.kv_heads, 0, packed.head_dim)
    shape = (packed.kv_heads, k_tail.shape[1] if k_tail.dim() == 3 else -1, packed.head_dim)
    for name, t in (("k_tail", k_tail), ("v_tail", v_tail)):
        if t.dim() != 3 or tuple(t.shape) != shape:
            raise ValueError(f"{name} must be [kv_heads={packed.kv_heads}, T, head_dim={packed.head_dim}] like "
                             f"k_tail, got {tuple(t.shape)}")
    if k_tail.dtype not in (torch.float32, torch.bfloat16):
        k_tail, v_tail = k_tail.float(), v_tail.float()
    v_tail = v_tail.to(k_tail.dtype)
    scale = packed.head_dim ** -0.5 if scale is None else float(scale)
    code = KV_KERNEL_CODES[resolve_kv_kernel(kernel)]
    return sparse_ops().sparse_kv_attention(q, packed.k_bitmaps, packed.k_values, packed.k_offsets,
                                            packed.v_bitmaps, packed.v_values, packed.v_offsets,
                                            k_tail.contiguous(), v_tail.contiguous(), packed.seq_len, scale, code)


# ------------------------------------------------------------------------------ transformers integration
def _mask_sizes(layer, args, kwargs) -> tuple[int, int]:
    """(key length, offset) of the attention mask for a layer that holds ``layer.get_seq_length()`` tokens."""
    query_length = args[0] if args else kwargs.get("query_length", kwargs.get("cache_position"))
    if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
        query_length = query_length.shape[0]
    return layer.get_seq_length() + int(query_length), 0


def _dynamic_layer():
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class SparseKVLayer(_dynamic_layer()):
    """A ``DynamicLayer`` whose prompt K/V are pruned and packed at the first update (the prefill); later
    tokens go to ``keys`` / ``values``, the dense tail. Batch 1."""

    def __init__(self, kv_config: SparseKVConfig = SparseKVConfig(), **kwargs):
        super().__init__(**kwargs)
        self.kv_config = kv_config
        self.kernel = resolve_kv_kernel(kv_config.kernel)
        self.packed: PackedKV | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(f"SparseKVCache decodes batch 1 (the paper's setting), got batch {key_states.shape[0]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.packed is None:  # the prompt: attend densely, keep it pruned and packed
            c = self.kv_config
            if c.layout == "dense":  # nothing pruned: skip the threshold search
                self.packed = pack_kv(key_states[0], value_states[0], layout="dense")
            else:
                self.packed = pack_kv(prune_kv(key_states[0], c.sparsity), prune_kv(value_states[0], c.v_sparsity))
            self.keys, self.values = key_states[:, :, :0].contiguous(), value_states[:, :, :0].contiguous()
            return key_states, value_states
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if key_states.shape[-2] == 1:  # a decode step: the attention function reads the packed part from here
            keys = self.keys
            keys._effllm_sparse_kv = self
            return keys, self.values
        # several tokens after the prompt (a second prompt, chunked prefill): attend over the pruned cache densely
        dt = key_states.dtype
        k = torch.cat([self.packed.keys().to(dt)[None], self.keys], dim=-2)
        v = torch.cat([self.packed.values().to(dt)[None], self.values], dim=-2)
        return k, v

    def get_seq_length(self) -> int:
        if self.packed is None:
            return 0
        return self.packed.seq_len + self.keys.shape[-2]

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return _mask_sizes(self, args, kwargs)

    def reset(self) -> None:
        super().reset()
        self.packed = None

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("SparseKVCache cannot be cropped (the pruned prompt is packed)")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("SparseKVCache is batch 1: no beam search")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("SparseKVCache is batch 1")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("SparseKVCache is batch 1")


class PreallocatedKVLayer(_dynamic_layer()):
    """A dense ``DynamicLayer`` that writes into a preallocated buffer (doubling when full) and returns views, so a
    decode step copies one token, not the whole history (``DynamicLayer`` concatenates: every step rewrites the
    cache). Decode steps are marked for ``dense_gqa_decode`` (no ``repeat_kv``). The fair dense baseline for the
    sparse cache, which also never rewrites its prompt part. Batch 1."""

    def __init__(self, reserve: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.reserve = int(reserve)
        self.length = 0
        self._k = self._v = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError(f"PreallocatedKVLayer is batch 1, got batch {key_states.shape[0]}")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if self._k is None or self.length + n > self._k.shape[-2]:
            cap = max(2 * (self._k.shape[-2] if self._k is not None else 0), self.length + n + self.reserve)
            k = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
            v = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
            if self.length:
                k[:, :, :self.length] = self._k[:, :, :self.length]
                v[:, :, :self.length] = self._v[:, :, :self.length]
            self._k, self._v = k, v
        self._k[:, :, self.length:self.length + n] = key_states
        self._v[:, :, self.length:self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]
        if n == 1:
            self.keys._effllm_dense_decode = True
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return _mask_sizes(self, args, kwargs)

    def reset(self) -> None:
        super().reset()
        self.length, self._k, self._v = 0, None, None

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        self.length = min(self.length, max_length)
        if self._k is not None:
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def dense_gqa_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None):
    """One decode token (batch 1) over a dense cache with grouped KV heads, without materialising ``repeat_kv``:
    the query heads of each KV head become that head's query rows, so K and V are read once. Returns
    (1, 1, heads, head_dim), transformers' attention-output layout."""
    _, heads, _, d = query.shape
    kv_heads = key.shape[1]
    q = query.reshape(1, kv_heads, heads // kv_heads, d)
    out = F.scaled_dot_product_attention(q, key, value, scale=scale)
    return out.reshape(1, 1, heads, d)


def _cache_base():
    from transformers.cache_utils import DynamicCache

    return DynamicCache


class PreallocatedKVCache(_cache_base()):
    """A ``DynamicCache`` whose full-attention layers are ``PreallocatedKVLayer`` (see there). Needs
    ``enable_sparse_kv_(model)`` for the decode steps to take ``dense_gqa_decode``."""

    def __init__(self, config, reserve: int = 256):
        super().__init__(config=config)
        dense = _dynamic_layer()
        self.layers = [PreallocatedKVLayer(reserve) if type(layer) is dense else layer for layer in self.layers]


class SparseKVCache(_cache_base()):
    """A ``DynamicCache`` for ``config`` whose full-attention layers prune and pack their prompt K/V
    (``SparseKVLayer``); sliding-window layers stay dense. Needs ``enable_sparse_kv_(model)`` first."""

    def __init__(self, config, kv_config: SparseKVConfig = SparseKVConfig()):
        if not isinstance(kv_config, SparseKVConfig):
            raise TypeError(f"kv_config must be a SparseKVConfig, got {type(kv_config).__name__}")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        impl = getattr(text, "_attn_implementation", None)
        if impl != ATTN_NAME:
            raise ValueError(f"the model attends with {impl!r}; call enable_sparse_kv_(model) first, or the decode "
                             "steps would attend only to the dense tail")
        super().__init__(config=config)
        dense = _dynamic_layer()
        if not self.layers:
            raise ValueError(f"{type(config).__name__}: could not build per-layer caches from this config")
        self.layers = [SparseKVLayer(kv_config) if type(layer) is dense else layer for layer in self.layers]
        if not any(isinstance(layer, SparseKVLayer) for layer in self.layers):
            raise ValueError("this model has no full-attention layer to prune")
        self.kv_config = kv_config


def _mask_all_visible(mask: torch.Tensor | None) -> bool:
    if mask is None:
        return True
    if mask.dtype == torch.bool:
        return bool(mask.all())
    return bool((mask == 0).all())


def sparse_kv_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function "effllm_sparse_kv": the sparse op at a decode step of a ``SparseKVLayer``,
    transformers' SDPA otherwise."""
    layer = getattr(key, "_effllm_sparse_kv", None)
    if (layer is None and getattr(key, "_effllm_dense_decode", False) and query.shape[0] == 1
            and query.shape[2] == 1 and kwargs.get("softcap") is None and kwargs.get("sliding_window") is None
            and _mask_all_visible(attention_mask)):
        return dense_gqa_decode(query, key, value, scaling).to(query.dtype), None
    if layer is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != 1:
        raise ValueError(f"the sparse KV path decodes one token at batch 1, got query {tuple(query.shape)}")
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("the sparse KV path has no logit soft-capping or sliding window")
    if not _mask_all_visible(attention_mask):
        raise ValueError("the sparse KV path attends to every cached position; this mask hides some (padding?)")
    out = sparse_kv_attention(query[0, :, 0, :], layer.packed, key[0], value[0], scaling, layer.kernel)
    return out.to(query.dtype).view(1, 1, query.shape[1], query.shape[3]), None


def enable_sparse_kv_(model):
    """Register the attention function and make ``model`` use it (SDPA wherever no ``SparseKVCache`` layer is
    decoding, so the model behaves as before with any other cache). Returns the model."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, sparse_kv_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_NAME)
    else:
        model.config._attn_implementation = ATTN_NAME
    return model
