"""The packed BitMoD weight: what a BitMoD-quantized linear layer really stores, and ``BitMoDLinear``.

    report = quantize_(model, BitMoDConfig(bits=4, group_size=128))   # fake quantization (floats)
    pack_(model, report)                                                # nn.Linear -> BitMoDLinear, in place
    model.state_dict()  ->  load_packed_(fresh_float_model, state_dict) # reload

Format, per output row and group of ``group_size`` weights along the input dimension:

* codes: 3 or 4 bits per weight, *sign-magnitude* FP codes, the hardware encoding BitMoD starts from. 4 bits:
  bit 3 the sign, bits 0-2 index the magnitudes 0, 1, 2, 3, 4, 6, 8, 12 (FP4 E2M1 x2); 3 bits: bit 2 the sign,
  bits 0-1 index 0, 1, 2, 4 (FP3 x2). The otherwise redundant -0 code (8, resp. 4) is the group's special
  value, so a group's data type only changes what that one code means: ER+ / ER- / EA+ / EA- = +10 / -10 /
  +16 / -16 at 4 bits, +3 / -3 / +6 / -6 at 3 bits (``datatypes.bitmod_grids`` order).
* a 2-bit type id (0..3 = ER+, ER-, EA+, EA-), four per byte.
* a scale: FP16 (what the released quantizers keep; 16 bits per group) for bf16 weights, FP32 for FP16 / FP32
  weights, whose fake-quantized values no FP16 scale reproduces, and for a bf16 tensor whose tiny scales FP16
  cannot hold (``pack_weight``'s ``scale_dtype="auto"``).

A group is stored as ``gp = round_up(group_size, 8)`` codes (the tail group of a row whose in_features is not a
multiple of the group size, and any group size that is not a multiple of 8, are padded with code 0 = 0.0).
Byte layout of one group (chosen so a SIMD lane or a GPU thread unpacks a contiguous run with one shift):

* 4 bits: ``gp / 2`` bytes; byte j holds code j in its low nibble and code j + gp/2 in its high nibble.
* 3 bits: a 2-bit plane of ``gp / 4`` bytes (byte j holds the low two bits of codes j, j + gp/4, j + gp/2,
  j + 3gp/4 in bits 0-1, 2-3, 4-5, 6-7) followed by a 1-bit plane of ``gp / 8`` bytes (bit i of the plane,
  little-endian, is bit 2 of code i).

Dequantization is ``(value(type, code) * float32(scale)).to(weight dtype)``: the same product in FP32 and the
same cast as ``quantize_tensor``, so the round trip reproduces the fake-quantized weight bit for bit.
At group 128 a weight costs 4 + 16/128 + 2/128 = 4.14 bits (3.14 at 3 bits); ``footprint()`` counts the
actual bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from . import datatypes as dt

MAGNITUDES = {4: (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0), 3: (0.0, 1.0, 2.0, 4.0)}
SPECIAL_VALUES = {4: (10.0, -10.0, 16.0, -16.0), 3: (3.0, -3.0, 6.0, -6.0)}
TYPE_NAMES = ("er_pos", "er_neg", "ea_pos", "ea_neg")
SCALE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
# "auto": FP16 scales for a bf16 weight when they reproduce every group (8 bits of weight mantissa leave room;
# tiny weights whose scales fall below FP16's normal range can fail), else FP32; always FP32 for FP16 / FP32
# weights, whose fake-quantized values carry the FP32 scale's full mantissa (most groups fail with FP16).
# quantize_ dtypes whose groups all come from the four BitMoD grids (single-type ones just use one id).
PACKABLE = {"bitmod": None, "er": None, "ea": None, "fp_er_pos": 0, "fp_er_neg": 1, "fp_ea_pos": 2, "fp_ea_neg": 3}
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@lru_cache(maxsize=2)
def _code_values_cached(bits: int) -> torch.Tensor:
    mags = MAGNITUDES[bits]
    sign = 1 << (bits - 1)
    table = torch.empty(4, 2 ** bits, dtype=torch.float32)
    for t in range(4):
        for code in range(2 ** bits):
            m = mags[code & (sign - 1)]
            table[t, code] = SPECIAL_VALUES[bits][t] if code == sign else (-m if code & sign else m)
    return table


def code_values(bits: int) -> torch.Tensor:
    """``[4, 2**bits]`` float32: the value of every code under each of the four BitMoD types."""
    if bits not in (3, 4):
        raise ValueError(f"bits must be 3 or 4, got {bits!r}")
    return _code_values_cached(bits).clone()


def padded_group(group_size: int) -> int:
    return -(-group_size // 8) * 8


def group_bytes(bits: int, group_size: int) -> int:
    return padded_group(group_size) * bits // 8


@dataclass
class PackedBitMoD:
    """A packed ``[out_features, in_features]`` weight (see the module docstring for the layout)."""

    codes: torch.Tensor      # uint8 [out, n_groups * group_bytes]
    scales: torch.Tensor     # float16 / float32 [out, n_groups]
    type_ids: torch.Tensor   # uint8 [out, ceil(n_groups / 4)], 2 bits per group
    in_features: int
    bits: int
    group_size: int
    dtype: torch.dtype       # the fake-quantized weight's dtype (dequantize casts to it)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.type_ids))

    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / (self.out_features * self.in_features)


# ----------------------------------------------------------------------------------------- bit packing
def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [..., gp] (gp a multiple of 8) -> bytes [..., gp * bits / 8] in the documented layout."""
    gp = codes.shape[-1]
    c = codes.to(torch.uint8)
    if bits == 4:
        return c[..., : gp // 2] | (c[..., gp // 2:] << 4)
    q = gp // 4
    low = c & 3
    plane2 = low[..., :q] | (low[..., q:2 * q] << 2) | (low[..., 2 * q:3 * q] << 4) | (low[..., 3 * q:] << 6)
    hi = ((c >> 2) & 1).unflatten(-1, (gp // 8, 8))
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=c.device)
    plane1 = (hi * weights).sum(-1, dtype=torch.int32).to(torch.uint8)
    return torch.cat([plane2, plane1], -1)


def _unpack_codes(packed: torch.Tensor, bits: int, gp: int) -> torch.Tensor:
    """Inverse of ``_pack_codes``: bytes [..., gp * bits / 8] -> codes int64 [..., gp]."""
    p = packed.to(torch.int64)
    if bits == 4:
        return torch.cat([p & 15, p >> 4], -1)
    q = gp // 4
    plane2, plane1 = p[..., :q], p[..., q:]
    low = torch.cat([(plane2 >> s) & 3 for s in (0, 2, 4, 6)], -1)
    hi = ((plane1.unsqueeze(-1) >> torch.arange(8, device=p.device)) & 1).flatten(-2)
    return low | (hi << 2)


def _pack_types(type_ids: torch.Tensor) -> torch.Tensor:
    """[out, n_groups] ids 0..3 -> uint8 [out, ceil(n_groups / 4)], group 4i + k in bits 2k, 2k+1 of byte i."""
    n = type_ids.shape[1]
    t = F.pad(type_ids.to(torch.uint8), (0, -n % 4)).unflatten(-1, (-1, 4))
    return t[..., 0] | (t[..., 1] << 2) | (t[..., 2] << 4) | (t[..., 3] << 6)


def _unpack_types(packed: torch.Tensor, n_groups: int) -> torch.Tensor:
    p = packed.to(torch.int64)
    return torch.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], -1).flatten(-2)[:, :n_groups]


# ------------------------------------------------------------------------------------- packing / unpacking
def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, in] -> float32 [rows, n_groups, group_size], the tail group zero-padded."""
    rows, cols = w.shape
    n_groups = -(-cols // group_size)
    return F.pad(w.float(), (0, n_groups * group_size - cols)).view(rows, n_groups, group_size)


def _nudge(scale: torch.Tensor, steps: int) -> torch.Tensor:
    """``scale`` moved by ``steps`` units in the last place of its own dtype (scales are >= 0)."""
    if steps == 0:
        return scale
    int_dtype = torch.int16 if scale.dtype == torch.float16 else torch.int32
    out = (scale.view(int_dtype) + steps).view(scale.dtype)
    return torch.where((scale > 0) & (out > 0) & torch.isfinite(out), out, scale)


_NUDGES = (0, -1, 1, -2, 2, -3, 3)


@torch.no_grad()
def pack_weight(w: torch.Tensor, bits: int, group_size: int, scale_dtype: str = "auto",
                type_ids: torch.Tensor | None = None, chunk_rows: int = 1024) -> PackedBitMoD:
    """Recover the packed form of a BitMoD fake-quantized weight (the output of ``quantize_tensor``).

    Works from the fake-quantized values alone (so it stays exact whatever scale search the quantizer does):
    per group and type it tries the scales ``max|w| / m`` for the largest magnitude ``m`` on either side of
    the type's value set, rounded to ``scale_dtype`` and moved a few units in the last place, and keeps the
    first (type, scale) whose dequantization reproduces the group bit for bit. ``type_ids`` (e.g. from
    ``quantize_tensor``) restricts each group to its type. A group that nothing reproduces raises
    ``ValueError``: the weight is not BitMoD-quantized at these bits and group size, or (FP32 weights) its
    scales need ``scale_dtype="fp32"``.
    """
    if not isinstance(w, torch.Tensor) or w.ndim != 2 or not torch.is_floating_point(w):
        raise ValueError(f"expected a 2-D floating-point weight, got {getattr(w, 'shape', type(w))}")
    if w.dtype not in _DTYPE_CODE:
        raise TypeError(f"weight dtype must be float32, bfloat16 or float16, got {w.dtype}")
    if bits not in (3, 4):
        raise ValueError(f"bits must be 3 or 4, got {bits!r}")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2, got {group_size!r}")
    if scale_dtype == "auto":
        if w.dtype == torch.bfloat16:
            try:
                return pack_weight(w, bits, group_size, "fp16", type_ids, chunk_rows)
            except ValueError:
                pass  # e.g. scales below FP16's normal range (tiny weights): FP32 for this tensor
        return pack_weight(w, bits, group_size, "fp32", type_ids, chunk_rows)
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be 'auto' or one of {sorted(SCALE_DTYPES)}, got {scale_dtype!r}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity")
    sdt = SCALE_DTYPES[scale_dtype]
    rows, cols = w.shape
    n_groups, gp = -(-cols // group_size), padded_group(group_size)
    table = code_values(bits).to(w.device)
    # code of each integer value -16..16 under each type (-1: not in that type's set)
    value_code = torch.full((4, 33), -1, dtype=torch.int64)
    for t in range(4):
        for code in range(2 ** bits):
            value_code[t, int(table[t, code]) + 16] = code
    value_code = value_code.to(w.device)
    if type_ids is not None and tuple(type_ids.shape) != (rows, n_groups):
        raise ValueError(f"type_ids must be [{rows}, {n_groups}], got {tuple(type_ids.shape)}")

    codes_out = torch.zeros(rows, n_groups, gp, dtype=torch.uint8, device=w.device)
    scales_out = torch.zeros(rows, n_groups, dtype=sdt, device=w.device)
    types_out = torch.zeros(rows, n_groups, dtype=torch.int64, device=w.device)
    for r0 in range(0, rows, chunk_rows):
        wc = w[r0:r0 + chunk_rows]
        target = _grouped(wc, group_size)                      # exact float32 copy of the weight
        flat_t = target.flatten(0, 1)                          # [groups, g]
        amax = flat_t.abs().amax(-1)
        todo = torch.ones(flat_t.shape[0], dtype=torch.bool, device=w.device)
        want_type = None if type_ids is None else type_ids[r0:r0 + chunk_rows].flatten().long()
        codes_c = torch.zeros(flat_t.shape, dtype=torch.int64, device=w.device)
        scales_c = torch.zeros(flat_t.shape[0], dtype=sdt, device=w.device)
        types_c = torch.zeros(flat_t.shape[0], dtype=torch.int64, device=w.device)
        candidates = []  # (type, value set, scale before nudging): the largest magnitude on either side
        for t in range(4):
            values = table[t].unique()  # sorted
            for m in sorted({float(values.max()), float(-values.min())}, reverse=True):
                candidates.append((t, values, (amax / m).to(sdt)))
        # nudges outermost: almost every group is reproduced by some type's un-nudged scale, so the later
        # passes only see the few groups left
        for step in _NUDGES:
            for t, values, base in candidates:
                idx = todo.nonzero().squeeze(1)
                if want_type is not None:
                    idx = idx[want_type[idx] == t]
                if idx.numel() == 0:
                    continue
                s = _nudge(base[idx], step)
                sf = s.float().unsqueeze(1)
                x = flat_t[idx]
                v = dt.round_to_values(x / torch.where(sf > 0, sf, torch.ones_like(sf)), values)
                recon = (v * sf).to(w.dtype).float()
                ok = (recon == x).all(1)
                hit = idx[ok]
                codes_c[hit] = value_code[t, v[ok].long() + 16]
                scales_c[hit] = s[ok]
                types_c[hit] = t
                todo[hit] = False
        if todo.any():
            bad = int(todo.sum())
            first = int(todo.nonzero()[0])
            raise ValueError(
                f"{bad} of {todo.numel()} groups (first: row {r0 + first // n_groups}, group {first % n_groups}) "
                f"are not reproduced by any BitMoD {bits}-bit type with an {scale_dtype} scale: the weight is not "
                f"BitMoD fake-quantized at bits={bits}, group_size={group_size}"
                + ("; FP32 weights usually need scale_dtype='fp32'" if scale_dtype == "fp16" else ""))
        n = wc.shape[0]
        codes_out[r0:r0 + n, :, :group_size] = codes_c.view(n, n_groups, group_size).to(torch.uint8)
        scales_out[r0:r0 + n] = scales_c.view(n, n_groups)
        types_out[r0:r0 + n] = types_c.view(n, n_groups)
    return PackedBitMoD(codes=_pack_codes(codes_out, bits).flatten(1).contiguous(), scales=scales_out.contiguous(),
                        type_ids=_pack_types(types_out).contiguous(), in_features=cols, bits=bits,
                        group_size=group_size, dtype=w.dtype)


def unpack_codes(p: PackedBitMoD) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 [out, n_groups, gp], type ids int64 [out, n_groups])."""
    gp = padded_group(p.group_size)
    codes = _unpack_codes(p.codes.view(p.out_features, p.n_groups, -1), p.bits, gp)
    return codes, _unpack_types(p.type_ids, p.n_groups)


def dequantize(p: PackedBitMoD) -> torch.Tensor:
    """The fake-quantized weight ``[out_features, in_features]`` in ``p.dtype`` (bit-exact)."""
    codes, types = unpack_codes(p)
    table = code_values(p.bits).to(p.codes.device)
    values = table[types.unsqueeze(-1), codes][..., : p.group_size]      # [out, n_groups, g]
    w = (values * p.scales.float().unsqueeze(-1)).to(p.dtype)
    return w.flatten(1)[:, : p.in_features]


# ------------------------------------------------------------------------------------------------ module
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
KERNELS = ("auto", "reference", "cpu", "triton")


class BitMoDLinear(nn.Module):
    """A linear layer that keeps its weight packed (buffers ``codes``, ``scales``, ``type_ids``, ``meta``).

    ``kernel``: "auto" (CPU: the C++ LUT GEMV of ``cpu_gemv``, falling back to "reference" where it cannot be
    built; CUDA: the Triton kernel of ``triton_gemv``), "reference" (dequantize, then ``F.linear``), "cpu" or
    "triton" (an error where unavailable). ``cpu_kernel`` picks the CPU instruction set ("auto", "portable",
    "avx2", "avx512").
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, dtype: torch.dtype,
                 scale_dtype: torch.dtype = torch.float16, bias: bool = False, kernel: str = "auto",
                 cpu_kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.dtype = bits, group_size, dtype
        self.kernel, self.cpu_kernel = kernel, cpu_kernel
        n_groups = -(-in_features // group_size)
        self.register_buffer("codes", torch.zeros(out_features, n_groups * group_bytes(bits, group_size),
                                                  dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(out_features, n_groups, dtype=scale_dtype))
        self.register_buffer("type_ids", torch.zeros(out_features, -(-n_groups // 4), dtype=torch.uint8))
        # saved with the weights so load_packed_ can rebuild the layer from a state_dict alone
        self.register_buffer("meta", torch.tensor([bits, group_size, in_features, _DTYPE_CODE[dtype]]))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_packed(cls, p: PackedBitMoD, bias: torch.Tensor | None = None, **kw) -> "BitMoDLinear":
        layer = cls(p.in_features, p.out_features, p.bits, p.group_size, p.dtype, p.scales.dtype,
                    bias is not None, **kw)
        layer.codes.copy_(p.codes)
        layer.scales.copy_(p.scales)
        layer.type_ids.copy_(p.type_ids)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer.to(p.codes.device)

    @property
    def packed(self) -> PackedBitMoD:
        return PackedBitMoD(self.codes, self.scales, self.type_ids, self.in_features, self.bits, self.group_size,
                            self.dtype)

    def footprint(self) -> dict:
        """Bytes actually stored for the weight (codes + scales + type ids; bias and ``meta`` not counted)."""
        nbytes = self.packed.nbytes()
        weights = self.in_features * self.out_features
        return {"bytes": nbytes, "weights": weights, "bytes_per_weight": nbytes / weights,
                "bits_per_weight": 8 * nbytes / weights, "dense_bf16_bytes": 2 * weights}

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with {self.in_features} features, got {tuple(x.shape)}")
        kernel = self.kernel
        if kernel == "auto":
            if x.is_cuda:
                kernel = "triton"
            else:
                from . import cpu_gemv
                kernel = "cpu" if cpu_gemv.extension_available() else "reference"
        if kernel == "cpu":
            from .cpu_gemv import bitmod_linear_cpu
            return bitmod_linear_cpu(x, self.packed, self.bias, kernel=self.cpu_kernel)
        if kernel == "triton":
            from .triton_gemv import bitmod_linear_triton
            return bitmod_linear_triton(x, self.packed, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, dtype={self.dtype}, scale={self.scales.dtype}, "
                f"bias={self.bias is not None}, kernel={self.kernel}")


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def pack_(model: nn.Module, report, scale_dtype: str = "auto", kernel: str = "auto") -> dict:
    """Replace the layers that ``quantize_`` fake-quantized (``report = quantize_(model, config)``) by
    ``BitMoDLinear`` holding their packed weights. Returns the model's footprint: packed bytes, weights and
    bits per weight over the packed layers.

    Only BitMoD-grid methods pack (``dtype`` "bitmod", "er", "ea" or one ``fp_e*`` type). The hook that makes
    ``quantize_(model, BitMoDConfig(..., packed=True))`` do this is one line at the end of ``quantize_``:
    ``if config.packed: pack_(model, report)``.
    """
    config = report.config
    if config["dtype"] not in PACKABLE:
        raise ValueError(f"only BitMoD-grid methods have a packed format ({', '.join(PACKABLE)}); "
                         f"the model was quantized with dtype={config['dtype']!r}")
    fixed = PACKABLE[config["dtype"]]
    total_bytes = total_weights = 0
    for name in report.layers["layer"]:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not the nn.Linear quantize_ saw")
        w = module.weight
        ids = None if fixed is None else torch.full((w.shape[0], -(-w.shape[1] // config["group_size"])), fixed)
        try:
            p = pack_weight(w.data, config["bits"], config["group_size"], scale_dtype, type_ids=ids)
        except ValueError as exc:
            raise ValueError(f"layer {name}: {exc}") from None
        layer = BitMoDLinear.from_packed(p, module.bias, kernel=kernel)
        _set_module(model, name, layer)
        total_bytes += p.nbytes()
        total_weights += w.numel()
    return {"layers": len(report.layers), "bytes": total_bytes, "weights": total_weights,
            "bits_per_weight": 8 * total_bytes / total_weights}


@torch.no_grad()
def load_packed_(model: nn.Module, state_dict: dict, kernel: str = "auto", strict: bool = True):
    """Load a packed model's ``state_dict`` into a float model of the same architecture: every layer whose
    state has ``<name>.meta`` becomes a ``BitMoDLinear`` first. Returns ``load_state_dict``'s result."""
    for key, meta in state_dict.items():
        if not key.endswith(".meta") or f"{key[:-5]}.codes" not in state_dict:
            continue
        name = key[:-5]
        bits, group_size, in_features, dtype_code = (int(v) for v in meta.tolist())
        if dtype_code not in _CODE_DTYPE:
            raise ValueError(f"{key}: unknown weight dtype code {dtype_code}")
        scales = state_dict[f"{name}.scales"]
        layer = BitMoDLinear(in_features, scales.shape[0], bits, group_size, _CODE_DTYPE[dtype_code], scales.dtype,
                             f"{name}.bias" in state_dict and state_dict[f"{name}.bias"] is not None, kernel=kernel)
        _set_module(model, name, layer.to(scales.device))
    return model.load_state_dict(state_dict, strict=strict)
