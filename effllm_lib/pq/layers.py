"""Product-quantized layers: a dot product becomes a nearest-prototype search plus table lookups.

The im2col view: a conv's input patch (Cin*Kh*Kw values, channel-major like ``F.unfold``) or a linear layer's
input row is cut into N_s = ceil(D / L_s) sub-vectors of length L_s. Each subspace s has N_p prototypes
P[s, p] (learned by k-means on real activations). Encoding maps a sub-vector to its nearest prototype
(squared L2); the table LUT[s, p, c] = P[s, p] . W[c, sub-vector s] is precomputed, and the output is

    y[c] = sum_s LUT[s, idx_s, c] + bias[c]

Odd sizes: when D is not a multiple of L_s, the input and the weight are zero-padded at the end to
N_s * L_s, so the last subspace holds the D - (N_s-1)*L_s real values followed by zeros. The padded
prototype coordinates are held at zero (a mask), so they never change a distance or a table entry.

Training (``self.training``): the assignment is a softmax over -distance / tau (differentiable; PECAN-style);
with ``straight_through`` the forward pass uses the hard one-hot assignment and the backward pass the soft
one, so training sees the inference-time output. Evaluation always uses the hard assignment.

Low-bit (``proto_bits`` / ``lut_bits``): prototypes and inputs share one asymmetric uniform grid per layer
(range = the prototypes' min..max; inputs are clamped to it, as the hardware stores both in ``proto_t``);
LUT entries use a symmetric grid per output channel. Rounding uses a straight-through gradient.

An uncalibrated layer (prototypes not set yet) computes the exact dense layer, so calibration can proceed
layer by layer through a partly converted model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# prototypes: prototypes trained, the LUT frozen at its k-means value (only the encoding moves);
# prototypes_derived: the paper's "prototypes only": prototypes trained and the LUT recomputed from them,
# LUT = P . W, in every forward pass (gradients reach the prototypes through the table too).
TRAIN_MODES = ("kmeans", "lut", "prototypes", "prototypes_derived", "both")


@dataclass
class PQConfig:
    """How to product-quantize a layer: N_p prototypes per subspace of length L_s, tau, table bit widths."""
    n_prototypes: int = 16
    subvec_len: int = 9
    tau: float = 0.01
    straight_through: bool = True
    proto_bits: int | None = None  # None = float prototypes
    lut_bits: int | None = None    # None = float LUT

    def __post_init__(self):
        if not isinstance(self.n_prototypes, int) or self.n_prototypes < 1:
            raise ValueError(f"n_prototypes must be a positive int, got {self.n_prototypes!r}")
        if not isinstance(self.subvec_len, int) or self.subvec_len < 1:
            raise ValueError(f"subvec_len must be a positive int, got {self.subvec_len!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        for name in ("proto_bits", "lut_bits"):
            bits = getattr(self, name)
            if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 16):
                raise ValueError(f"{name} must be None (float) or an int in 2..16, got {bits!r}")


# ------------------------------------------------------------------------------------------- quantizers
def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def proto_grid(prototypes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero point) of the asymmetric grid spanning the prototypes' range with 2**bits levels."""
    lo, hi = prototypes.detach().min(), prototypes.detach().max()
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))  # 0 exact
    scale = torch.clamp((hi - lo) / (2**bits - 1), min=1e-12)
    zero = torch.round(-lo / scale)
    return scale, zero


def fake_quant_asym(x: torch.Tensor, scale, zero, bits: int) -> torch.Tensor:
    q = torch.clamp(_round_ste(x / scale) + zero, 0, 2**bits - 1)
    return (q - zero) * scale


def lut_scale(lut: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel symmetric scale of a LUT [N_s, N_p, Cout]."""
    return torch.clamp(lut.detach().abs().amax(dim=(0, 1)) / (2 ** (bits - 1) - 1), min=1e-12)


def fake_quant_sym(x: torch.Tensor, scale, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(_round_ste(x / scale), -qmax, qmax) * scale


# ------------------------------------------------------------------------------------------------ core
class _PQBase(nn.Module):
    """The PQ computation on rows of length ``in_features``; subclasses reshape their input to rows."""

    def __init__(self, in_features: int, out_features: int, config: PQConfig, bias: bool):
        super().__init__()
        if not isinstance(config, PQConfig):
            raise TypeError(f"config must be a PQConfig, got {type(config).__name__}")
        self.in_features, self.out_features, self.config = in_features, out_features, config
        n_p, l_s = config.n_prototypes, config.subvec_len
        self.n_subspaces = math.ceil(in_features / l_s)
        self.pad = self.n_subspaces * l_s - in_features
        self.prototypes = nn.Parameter(torch.zeros(self.n_subspaces, n_p, l_s))
        self.lut = nn.Parameter(torch.zeros(self.n_subspaces, n_p, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        # the dense weight [Cout, D]: the reference before calibration and the source of the LUT
        self.register_buffer("weight_2d", torch.zeros(out_features, in_features))
        mask = torch.ones(self.n_subspaces * l_s)
        mask[in_features:] = 0
        self.register_buffer("proto_mask", mask.view(self.n_subspaces, 1, l_s))
        self.register_buffer("calibrated", torch.tensor(False))
        self.derive_lut = False  # True: the forward pass uses LUT = P . W (prototypes_derived training)

    # --- tables
    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Set prototypes [N_s, N_p, L_s] (padded coordinates are zeroed) and rebuild LUT = P . W."""
        if prototypes.shape != self.prototypes.shape:
            raise ValueError(f"prototypes must have shape {tuple(self.prototypes.shape)}, "
                             f"got {tuple(prototypes.shape)}")
        with torch.no_grad():
            self.prototypes.copy_(prototypes * self.proto_mask)
            self.lut.copy_(self.lut_from_weight())
            self.calibrated.fill_(True)

    def lut_from_weight(self) -> torch.Tensor:
        """LUT[s, p, c] = P[s, p] . W[c, s*L_s:(s+1)*L_s] (brute-force definition, vectorized)."""
        w = F.pad(self.weight_2d, (0, self.pad)).view(self.out_features, self.n_subspaces, -1)
        return torch.einsum("spl,csl->spc", self.prototypes * self.proto_mask, w)

    def quantized_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(prototypes, LUT) as the forward pass uses them: masked and fake-quantized when bits are set."""
        protos = self.prototypes * self.proto_mask
        if self.config.proto_bits:
            scale, zero = proto_grid(protos, self.config.proto_bits)
            protos = fake_quant_asym(protos, scale, zero, self.config.proto_bits)
        lut = self.lut_from_weight() if self.derive_lut else self.lut
        if self.config.lut_bits:
            lut = fake_quant_sym(lut, lut_scale(lut, self.config.lut_bits), self.config.lut_bits)
        return protos, lut

    def subvectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows [M, D] -> sub-vectors [N_s, M, L_s] (zero-padded, on the prototype grid if quantized)."""
        x = F.pad(rows, (0, self.pad))
        if self.config.proto_bits:
            scale, zero = proto_grid(self.prototypes * self.proto_mask, self.config.proto_bits)
            x = fake_quant_asym(x, scale, zero, self.config.proto_bits)
        return x.view(rows.shape[0], self.n_subspaces, -1).transpose(0, 1)

    def distances(self, sub: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances [N_s, M, N_p] (|x|^2 included, so they are true distances).

        On a low-bit grid the distances are computed on the integer codes (exact in float32 for the sizes
        used here), so ties are exact ties and argmin picks the lower index, like the hardware.
        """
        scale = None
        if self.config.proto_bits:
            scale, _ = proto_grid(self.prototypes * self.proto_mask, self.config.proto_bits)
            sub, protos = _round_ste(sub / scale), _round_ste(protos / scale)
        cross = torch.bmm(sub, protos.transpose(1, 2))
        dist = (sub * sub).sum(-1, keepdim=True) - 2 * cross + (protos * protos).sum(-1).unsqueeze(1)
        return dist if scale is None else dist * scale**2

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """Index of the nearest prototype per subspace, [M, N_s] (int64)."""
        protos, _ = self.quantized_tables()
        return self.distances(self.subvectors(rows), protos).argmin(-1).transpose(0, 1)

    def forward_rows(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[-1] != self.in_features:
            raise ValueError(f"expected rows of {self.in_features} features, got {rows.shape[-1]}")
        if not bool(self.calibrated):
            out = rows @ self.weight_2d.t()
            return out + self.bias if self.bias is not None else out
        protos, lut = self.quantized_tables()
        dist = self.distances(self.subvectors(rows), protos)  # [N_s, M, N_p]
        n_s, m, n_p = dist.shape
        if self.training:
            soft = torch.softmax(-dist / self.config.tau, dim=-1)
            assign = soft
            if self.config.straight_through:
                hard = F.one_hot(dist.argmin(-1), n_p).to(soft.dtype)
                assign = hard + soft - soft.detach()
            out = assign.transpose(0, 1).reshape(m, n_s * n_p) @ lut.reshape(n_s * n_p, -1)
        else:
            # gather-and-accumulate: row m sums LUT rows s*N_p + idx[m, s]
            idx = dist.argmin(-1).transpose(0, 1) + torch.arange(n_s, device=rows.device) * n_p
            out = F.embedding_bag(idx, lut.reshape(n_s * n_p, -1), mode="sum")
        return out + self.bias if self.bias is not None else out

    def extra_repr(self) -> str:
        c = self.config
        return (f"N_s={self.n_subspaces}, L_s={c.subvec_len}, N_p={c.n_prototypes}, pad={self.pad}, "
                f"proto_bits={c.proto_bits}, lut_bits={c.lut_bits}, tau={c.tau}")


class PQLinear(_PQBase):
    """A product-quantized ``nn.Linear``: input [..., in_features] -> [..., out_features]."""

    def __init__(self, in_features: int, out_features: int, config: PQConfig = PQConfig(), bias: bool = True):
        super().__init__(in_features, out_features, config, bias)

    @classmethod
    def from_dense(cls, linear: nn.Linear, config: PQConfig) -> "PQLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        pq = cls(linear.in_features, linear.out_features, config, bias=linear.bias is not None)
        pq.to(linear.weight.device)
        with torch.no_grad():
            pq.weight_2d.copy_(linear.weight)
            if linear.bias is not None:
                pq.bias.copy_(linear.bias)
        return pq

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_rows(self.rows(x)).view(*x.shape[:-1], self.out_features)


class PQConv2d(_PQBase):
    """A product-quantized ``nn.Conv2d`` (groups=1) computed on the im2col view of its input.

    ``padding`` is what ``nn.Conv2d`` takes: an int, a pair, ``"valid"`` or ``"same"`` (stride 1; like PyTorch,
    an odd total puts the extra row/column at the bottom/right), with any ``padding_mode``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, config: PQConfig = PQConfig(),
                 stride=1, padding=0, dilation=1, bias: bool = True, padding_mode: str = "zeros"):
        ks = nn.modules.utils._pair(kernel_size)
        super().__init__(in_channels * ks[0] * ks[1], out_channels, config, bias)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride, self.dilation = nn.modules.utils._pair(stride), nn.modules.utils._pair(dilation)
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be zeros/reflect/replicate/circular, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1 (as in nn.Conv2d), got stride {self.stride}")
            self.padding = padding
        else:
            self.padding = nn.modules.utils._pair(padding)
        # explicit (left, right, top, bottom) pads, the order F.pad takes
        if self.padding == "same":
            (th, tw) = (d * (k - 1) for d, k in zip(self.dilation, ks))
            self.pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        elif self.padding == "valid":
            self.pads = (0, 0, 0, 0)
        else:
            self.pads = (self.padding[1], self.padding[1], self.padding[0], self.padding[0])

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, config: PQConfig) -> "PQConv2d":
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"expected nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"PQConv2d supports groups=1 only (a PQ subspace spans all input channels of a "
                             f"patch); got groups={conv.groups}")
        pq = cls(conv.in_channels, conv.out_channels, conv.kernel_size, config, conv.stride, conv.padding,
                 conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode)
        pq.to(conv.weight.device)
        with torch.no_grad():
            pq.weight_2d.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                pq.bias.copy_(conv.bias)
        return pq

    def out_size(self, h: int, w: int) -> tuple[int, int]:
        left, right, top, bottom = self.pads
        return tuple((n + p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                     zip((h, w), (top + bottom, left + right), self.dilation, self.kernel_size, self.stride))

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """im2col: [B, Cin, H, W] -> [B*Hout*Wout, Cin*Kh*Kw] (channel-major rows, like the weight)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if self.kernel_size == (1, 1) and self.stride == (1, 1) and self.pads == (0, 0, 0, 0):
            return x.permute(0, 2, 3, 1).reshape(-1, self.in_channels)  # 1x1: no unfold needed
        left, right, top, bottom = self.pads
        if self.padding_mode == "zeros" and left == right and top == bottom:
            cols = F.unfold(x, self.kernel_size, self.dilation, (top, left), self.stride)
        else:  # asymmetric 'same' or a non-zero mode: pad explicitly, as nn.Conv2d does
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            cols = F.unfold(F.pad(x, self.pads, mode=mode), self.kernel_size, self.dilation, 0, self.stride)
        return cols.transpose(1, 2).reshape(-1, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ho, wo = self.out_size(h, w)
        out = self.forward_rows(self.rows(x))
        return out.view(b, ho, wo, self.out_features).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------- convert
def pq_layers(model: nn.Module) -> list[tuple[str, _PQBase]]:
    """The PQ layers of a model in forward-definition order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _PQBase)]


ROLES = ("first_conv", "classifier")


def role_names(model: nn.Module) -> dict[str, str | None]:
    """The module names that play each role in ``ROLES``, by definition order (``named_modules``).

    first_conv: the first ``nn.Conv2d``. classifier: the last ``nn.Linear``, or the last ``nn.Conv2d`` of a
    network without one (a 1x1-conv head). Definition order is forward order for the usual CNN; a model that
    defines its head before its stem should name its layers in ``skip`` instead.
    """
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"first_conv": convs[0] if convs else None,
            "classifier": linears[-1] if linears else (convs[-1] if len(convs) > 1 else None)}


def pq_convert_(model: nn.Module, config: PQConfig, *, skip=(), skip_roles=ROLES, min_in_features: int = 1,
                on_unsupported: str = "error") -> nn.Module:
    """Replace every Conv2d / Linear of ``model`` in place by its PQ version (uncalibrated = still exact).

    Left dense: the layers playing ``skip_roles`` (default: the first conv and the classifier, as in the paper:
    ResNet-20's 3-channel stem and its FC are not PQ layers; see ``role_names``), the modules named in ``skip``
    (a name also skips everything under it), and layers with fewer than ``min_in_features`` inputs. A grouped
    (e.g. depthwise) conv has no PQ version: ``on_unsupported="error"`` (default) raises a ValueError naming it,
    ``"skip"`` leaves it dense. Returns the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"pq_convert_ needs an nn.Module, got {type(model).__name__}")
    if isinstance(skip, str) or isinstance(skip_roles, str):
        raise TypeError("skip and skip_roles are sequences of names, e.g. skip=('stem',), not one string")
    if on_unsupported not in ("error", "skip"):
        raise ValueError(f"on_unsupported must be 'error' or 'skip', got {on_unsupported!r}")
    modules = dict(model.named_modules())
    unknown = [s for s in skip if s not in modules or s == ""]
    if unknown:
        raise ValueError(f"skip names {unknown}, which the model has no module of (its layers: "
                         f"{[n for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))]})")
    bad_roles = [r for r in skip_roles if r not in ROLES]
    if bad_roles:
        raise ValueError(f"unknown skip_roles {bad_roles}; the roles are {ROLES}")
    roles = role_names(model)
    skipped = set(skip) | {roles[r] for r in skip_roles if roles[r] is not None}

    def is_skipped(full: str) -> bool:
        return any(full == s or full.startswith(s + ".") for s in skipped)

    converted = 0
    for name, module in list(model.named_modules()):
        if name and is_skipped(name):
            continue
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if is_skipped(full):
                continue
            if isinstance(child, nn.Conv2d):
                if child.in_channels * child.kernel_size[0] * child.kernel_size[1] < min_in_features:
                    continue
                if child.groups != 1:
                    if on_unsupported == "skip":
                        continue
                    raise ValueError(f"pq_convert_: layer {full!r} is a grouped conv (groups={child.groups}); PQ "
                                     "layers need groups=1 (a subspace spans all input channels of a patch). "
                                     f"Leave it dense with skip=(..., {full!r}) or on_unsupported='skip'")
                setattr(module, child_name, PQConv2d.from_dense(child, config))
                converted += 1
            elif type(child) is nn.Linear and child.in_features >= min_in_features:
                setattr(module, child_name, PQLinear.from_dense(child, config))
                converted += 1
    if converted == 0:
        raise ValueError(f"pq_convert_ found no Conv2d/Linear layer to convert (left dense: {sorted(skipped)}, "
                         f"min_in_features={min_in_features})")
    return model


def set_bits_(model: nn.Module, proto_bits: int | None, lut_bits: int | None) -> nn.Module:
    """Change the table bit widths of every PQ layer (for low-bit sweeps on one calibrated model)."""
    for _, layer in pq_layers(model):
        layer.config = PQConfig(**{**layer.config.__dict__, "proto_bits": proto_bits, "lut_bits": lut_bits})
    return model


def set_tau_(model: nn.Module, tau: float) -> nn.Module:
    """Set the softmax temperature of every PQ layer (a bad tau raises, as in PQConfig)."""
    for _, layer in pq_layers(model):
        layer.config = PQConfig(**{**layer.config.__dict__, "tau": tau})
    return model


def set_forward_(model: nn.Module, forward: str) -> nn.Module:
    """Choose the training-time forward pass of every PQ layer: "soft" (the output is the softmax-weighted sum
    of table rows, differentiable, as in PECAN / the paper's temperature study) or "straight_through" (the
    hard output, with the soft assignment's gradient). Evaluation is always hard."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {FORWARDS}, got {forward!r}")
    for _, layer in pq_layers(model):
        layer.config = PQConfig(**{**layer.config.__dict__, "straight_through": forward == "straight_through"})
    return model


FORWARDS = ("soft", "straight_through")
