"""SparAMX's compressed weight format: a bitmap per tile row plus the nonzero values, packed in tile order.

The weight of a linear layer is ``W[out, in]`` (``N x K``). AMX multiplies ``A[M, K] @ B[K, N]`` where B is
held in "VNNI" layout: each row of a B tile holds, for 16 output columns, a *group* of consecutive input
elements (2 for bf16, 4 for int8) side by side. One B tile is 16 rows x 64 bytes:

* bf16: 16 rows = 16 pairs of inputs (32 inputs), 32 bf16 per row = 16 outputs x 2 inputs; a 32-bit bitmap
  per row.
* int8: 16 rows = 16 quads of inputs (64 inputs), 64 int8 per row = 16 outputs x 4 inputs; a 64-bit bitmap
  per row.

Element ``c`` of row ``r`` of tile ``(strip s, k-tile t)`` is ``W[16 s + c // g, t * 16 g + g r + c % g]``
with ``g`` the group size; bit ``c`` of the row's bitmap (least significant bit = element 0) says whether it
is nonzero, and only nonzeros are stored, in row-major order inside a tile. A *strip* is the 16 output
columns ``16 s .. 16 s + 15`` over the whole input dimension; strips are stored one after another, each
strip's tiles in k order. ``strip_offsets[s]`` is where strip ``s`` starts in ``values``.

The original stores the start offset of each *thread's* slice of strips, so the thread count is fixed when
the weight is converted; offsets per strip are the same information at finer grain, so any thread count
(each thread takes a contiguous range of strips) works with one conversion. Decompression of a row is one
masked expand-load (``vpexpandw`` / ``vpexpandb``): the mask is the bitmap, the source is the next
``popcount(mask)`` packed values.

``N`` is padded to a multiple of 16 and ``K`` to a multiple of 32 (bf16) or 64 (int8) with zeros; padding
costs only bitmap bits. Storage is 1 bit per (padded) weight + 2 bytes (bf16) or 1 byte (int8) per nonzero,
plus 8 bytes per strip. ``values`` carries 64 bytes of zero slack at its end so a kernel may load a full
vector at the last row without reading past the buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_ROWS = 16  # rows of a B tile = groups of inputs
STRIP = 16  # output columns per tile
TILE_BYTES = 64  # bytes per tile row
SLACK_BYTES = 64  # zero padding after the packed values


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight has an empty dimension: shape {tuple(weight.shape)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.device.type != "cpu":
        raise ValueError(f"the sparse CPU kernels need a CPU weight, got device {weight.device}")


def _to_tiles(w: torch.Tensor, group: int) -> torch.Tensor:
    """[Np, Kp] -> [strips, k_tiles, 16 rows, 16 * group] in VNNI tile order (a view-free copy)."""
    n_pad, k_pad = w.shape
    k_tile = TILE_ROWS * group
    t = w.reshape(n_pad // STRIP, STRIP, k_pad // k_tile, TILE_ROWS, group)  # s, col, t, row, g
    return t.permute(0, 2, 3, 1, 4).reshape(n_pad // STRIP, k_pad // k_tile, TILE_ROWS, STRIP * group).contiguous()


def _from_tiles(tiles: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of ``_to_tiles``: [strips, k_tiles, 16, 16 * group] -> [Np, Kp]."""
    s, t = tiles.shape[:2]
    w = tiles.reshape(s, t, TILE_ROWS, STRIP, group).permute(0, 3, 1, 2, 4)
    return w.reshape(s * STRIP, t * TILE_ROWS * group)


def _bitmaps(nonzero: torch.Tensor) -> torch.Tensor:
    """[..., bits] bool -> [...] int64 with bit i = nonzero[..., i]."""
    bits = nonzero.shape[-1]
    weights = torch.ones(bits, dtype=torch.int64) << torch.arange(bits, dtype=torch.int64)
    return (nonzero.to(torch.int64) * weights).sum(-1)


def _unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """[...] integer words -> [..., bits] bool (bit i of each word)."""
    shifts = torch.arange(bits, dtype=torch.int64)
    return ((words.to(torch.int64).unsqueeze(-1) >> shifts) & 1).bool()


def _pack(tiles: torch.Tensor, value_dtype: torch.dtype, slack: int):
    nonzero = tiles != 0
    words = _bitmaps(nonzero)
    values = tiles[nonzero]  # row-major order = tile order
    per_strip = nonzero.flatten(1).sum(1)
    offsets = torch.zeros(tiles.shape[0] + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(per_strip, 0)
    values = torch.cat([values.to(value_dtype), torch.zeros(slack, dtype=value_dtype)])
    return words, values, offsets


class _TiledWeight:
    """What both compressed formats share: strips of 16 output rows, tiles of ``k_tile`` inputs."""

    @property
    def nnz(self) -> int:
        return int(self.strip_offsets[-1])

    @property
    def padded_shape(self) -> tuple[int, int]:
        return self.bitmaps.shape[0] * STRIP, self.bitmaps.shape[1] * self.k_tile


@dataclass
class SparseBF16Weight(_TiledWeight):
    """A bf16 weight ``[out_features, in_features]`` in the compressed tile format (see module docstring)."""

    bitmaps: torch.Tensor  # int32 [strips, k_tiles, 16]: bit c of row r = element c is nonzero
    values: torch.Tensor  # bf16 [nnz + 32]: nonzeros in tile order, then zero slack
    strip_offsets: torch.Tensor  # int64 [strips + 1]: start of each strip in values; last = nnz
    out_features: int
    in_features: int

    group = 2
    k_tile = 32

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.out_features * self.in_features)

    def nbytes(self) -> int:
        """Bytes a kernel reads for the weight: bitmaps + packed values + strip offsets (no slack)."""
        return self.bitmaps.numel() * 4 + self.nnz * 2 + self.strip_offsets.numel() * 8

    def to_dense(self) -> torch.Tensor:
        """The bf16 weight ``[out_features, in_features]`` back, exactly."""
        return unpack_bf16(self)


@dataclass
class SparseInt8Weight(_TiledWeight):
    """An int8 weight (symmetric, one scale per output row) in the compressed 16 x 64 tile format."""

    bitmaps: torch.Tensor  # int64 [strips, k_tiles, 16]
    values: torch.Tensor  # int8 [nnz + 64]
    strip_offsets: torch.Tensor  # int64 [strips + 1]
    scales: torch.Tensor  # float32 [out_features]: W ~= scales[:, None] * q
    out_features: int
    in_features: int

    group = 4
    k_tile = 64

    def nbytes(self) -> int:
        return self.bitmaps.numel() * 8 + self.nnz + self.strip_offsets.numel() * 8 + self.scales.numel() * 4

    def to_int8(self) -> torch.Tensor:
        """The int8 weight ``[out_features, in_features]`` back, exactly."""
        return unpack_int8(self)

    def to_dense(self) -> torch.Tensor:
        """The dequantized float32 weight."""
        return self.to_int8().float() * self.scales[:, None]


def pack_bf16(weight: torch.Tensor) -> SparseBF16Weight:
    """Compress a dense weight ``[out, in]`` (cast to bf16; zeros are the pruned weights)."""
    _check_weight(weight)
    n, k = weight.shape
    w = weight.detach().to(torch.bfloat16)
    w = torch.nn.functional.pad(w, (0, _round_up(k, 32) - k, 0, _round_up(n, STRIP) - n))
    words, values, offsets = _pack(_to_tiles(w, 2), torch.bfloat16, SLACK_BYTES // 2)
    return SparseBF16Weight(_as_int32(words), values, offsets, n, k)


def pack_bf16_fast(weight: torch.Tensor) -> SparseBF16Weight:
    """``pack_bf16`` computed by the extension on all threads (same result; ``pack_bf16`` is the reference the
    tests compare it with). Zeros are any bf16 zero, +0 or -0, as in ``pack_bf16``."""
    _check_weight(weight)
    from ._build import load_extension

    w = weight.detach().to(torch.bfloat16).contiguous()
    err, bitmaps, values, offsets = load_extension().pack_bf16_fast(w)
    if err:
        raise RuntimeError(err)
    return SparseBF16Weight(bitmaps, values, offsets, w.shape[0], w.shape[1])


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_bf16(packed: SparseBF16Weight) -> torch.Tensor:
    nonzero = _unpack_bits(packed.bitmaps.to(torch.int64) & 0xFFFFFFFF, 32)
    tiles = torch.zeros(nonzero.shape, dtype=torch.bfloat16)
    if int(nonzero.sum()) != packed.nnz:
        raise ValueError(f"corrupt SparseBF16Weight: bitmaps count {int(nonzero.sum())} nonzeros, "
                         f"strip_offsets say {packed.nnz}")
    tiles[nonzero] = packed.values[: packed.nnz]
    return _from_tiles(tiles, 2)[: packed.out_features, : packed.in_features].contiguous()


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: (q int8 [N, K], scale float32 [N]) with W ~= scale[:, None] * q."""
    _check_weight(weight)
    w = weight.detach().float()
    scale = w.abs().amax(1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, q = 0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_tokens_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-token int8 of activations [M, K]: (q int8, scale float32 [M])."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_int8(weight: torch.Tensor, scales: torch.Tensor | None = None) -> SparseInt8Weight:
    """Compress a weight into the int8 format.

    A float weight is quantized per output row first (``quantize_rows_int8``); an int8 weight is taken as
    is with the given per-row ``scales`` (default 1).
    """
    if weight.dtype == torch.int8:
        if weight.dim() != 2 or 0 in weight.shape:
            raise ValueError(f"weight must be 2-D and non-empty, got shape {tuple(weight.shape)}")
        q = weight
        scales = torch.ones(q.shape[0]) if scales is None else scales.float()
    else:
        if scales is not None:
            raise ValueError("scales are only taken with an int8 weight; a float weight is quantized here")
        q, scales = quantize_rows_int8(weight)
    if scales.shape != (q.shape[0],):
        raise ValueError(f"scales must have shape ({q.shape[0]},), got {tuple(scales.shape)}")
    n, k = q.shape
    w = torch.nn.functional.pad(q, (0, _round_up(k, 64) - k, 0, _round_up(n, STRIP) - n))
    words, values, offsets = _pack(_to_tiles(w, 4), torch.int8, SLACK_BYTES)
    return SparseInt8Weight(words, values, offsets, scales.contiguous(), n, k)


def unpack_int8(packed: SparseInt8Weight) -> torch.Tensor:
    words = packed.bitmaps
    nonzero = _unpack_bits(words, 64)  # arithmetic shift of a negative word still yields its bits
    if int(nonzero.sum()) != packed.nnz:
        raise ValueError(f"corrupt SparseInt8Weight: bitmaps count {int(nonzero.sum())} nonzeros, "
                         f"strip_offsets say {packed.nnz}")
    tiles = torch.zeros(nonzero.shape, dtype=torch.int8)
    tiles[nonzero] = packed.values[: packed.nnz]
    return _from_tiles(tiles, 4)[: packed.out_features, : packed.in_features].contiguous()


def pack_dense_bf16_vnni(weight: torch.Tensor) -> torch.Tensor:
    """The dense bf16 weight in the same tile order, all values kept: [strips, k_tiles, 16, 32] (AMX baseline)."""
    _check_weight(weight)
    n, k = weight.shape
    w = torch.nn.functional.pad(weight.detach().to(torch.bfloat16), (0, _round_up(k, 32) - k,
                                                                     0, _round_up(n, STRIP) - n))
    return _to_tiles(w, 2)


def compression_ratio(sparsity: float) -> float:
    """Dense bf16 bytes over compressed bytes at a given sparsity: 2 / (2 (1 - s) + 1/8)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return 2.0 / (2.0 * (1.0 - sparsity) + 0.125)


def validate_packed(weight: SparseBF16Weight | SparseInt8Weight) -> None:
    """What the kernels trust about a compressed weight (dtypes, shapes, strip offsets starting at 0 and never
    decreasing, values long enough for them plus the slack a full-vector load may touch), checked when a
    weight is packed, wrapped in a module or loaded, so the ops need only O(1) checks per call. A weight edited
    after packing (e.g. truncated values) is refused with a clear message (RuntimeError)."""
    if not isinstance(weight, (SparseBF16Weight, SparseInt8Weight)):
        raise TypeError(f"expected a SparseBF16Weight or SparseInt8Weight, got {type(weight).__name__}")
    is_int8 = isinstance(weight, SparseInt8Weight)
    strips = -(-weight.out_features // STRIP)
    k_tile = 64 if is_int8 else 32
    bitmap_dtype, value_dtype = (torch.int64, torch.int8) if is_int8 else (torch.int32, torch.bfloat16)
    slack = 64 if is_int8 else 32
    bm, vals, offs = weight.bitmaps, weight.values, weight.strip_offsets
    for name, t, dtype in (("bitmaps", bm, bitmap_dtype), ("values", vals, value_dtype),
                           ("strip_offsets", offs, torch.int64)):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu":
            raise RuntimeError(f"compressed weight: {name} must be a {dtype} CPU tensor")
    if bm.shape != (strips, -(-weight.in_features // k_tile), 16):
        raise RuntimeError(f"compressed weight: bitmaps has shape {tuple(bm.shape)}, expected "
                           f"({strips}, {-(-weight.in_features // k_tile)}, 16) for {weight.out_features}x"
                           f"{weight.in_features}")
    if offs.shape != (strips + 1,) or int(offs[0]) != 0 or bool((offs[1:] < offs[:-1]).any()):
        raise RuntimeError("compressed weight: strip_offsets must be [strips + 1], start at 0 and never decrease")
    if vals.dim() != 1 or vals.numel() < int(offs[-1]) + slack:
        raise RuntimeError(f"compressed weight: values has {vals.numel()} elements, the strip offsets need "
                           f"{int(offs[-1])} nonzeros + {slack} slack")
