"""Calibrate and fine-tune PQ models: k-means on real activations, then gradient steps on the tables.

    model = train_float(net, train_set, epochs=3)
    pq_convert_(model, PQConfig(n_prototypes=16, subvec_len=9))
    calibrate_(model, calib_images)                 # layer by layer k-means on the activations each layer sees
    finetune_(model, train_set, mode="both", epochs=1)
    accuracy(model, test_set)

The "e2e" recipe (PECAN / LUT-NN style, what the chapter's best PQ numbers use) replaces the last three steps:

    progressive_convert_(model, PQConfig(16, 9), train_set, teacher=float_model, calib_images=calib,
                         epochs_per_layer=0.25, augment=augment_crop_flip)   # convert + calibrate layer by layer
    finetune_e2e_(model, train_set, teacher=float_model, epochs=12, augment=augment_crop_flip)
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ROLES, TRAIN_MODES, PQConfig, PQConv2d, PQLinear, _PQBase, pq_convert_, pq_layers, set_tau_


# --------------------------------------------------------------------------------------------- k-means
def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, init_points: int = 2048) -> torch.Tensor:
    """Batched Lloyd k-means with k-means++ seeding: x [S, M, L] -> centroids [S, k, L].

    Each of the S subspaces is clustered independently. Seeding runs on a random subset of ``init_points``
    points (k-means++ is sequential in k). With fewer distinct points than k, the extra centroids duplicate
    existing ones (they are then never the unique nearest, which is harmless).
    """
    if x.dim() != 3:
        raise ValueError(f"kmeans expects [subspaces, points, dim], got shape {tuple(x.shape)}")
    s, m, l = x.shape
    if m == 0:
        raise ValueError("kmeans got no points")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    gen = torch.Generator(device="cpu").manual_seed(seed)  # random draws on the CPU: same seeds on any device
    x = x.float()
    ar = torch.arange(s, device=x.device)
    seed_pts = x[:, torch.randperm(m, generator=gen)[:init_points].to(x.device)]
    # k-means++: each next centroid drawn with probability proportional to the squared distance
    cent = seed_pts[ar, torch.randint(seed_pts.shape[1], (s,), generator=gen).to(x.device)].unsqueeze(1)
    d2 = ((seed_pts - cent) ** 2).sum(-1)
    for _ in range(1, k):
        cdf = (d2.double() + 1e-12).cumsum(-1)  # + 1e-12: all points equal -> pick uniformly
        u = torch.rand(s, 1, generator=gen, dtype=torch.float64).to(x.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u).squeeze(1).clamp(max=cdf.shape[1] - 1)  # inverse-CDF draw
        new = seed_pts[ar, pick].unsqueeze(1)
        cent = torch.cat([cent, new], 1)
        d2 = torch.minimum(d2, ((seed_pts - new) ** 2).sum(-1))
    ones = torch.ones(s, m, device=x.device)
    for _ in range(iters):
        # argmin |x - c|^2 = argmin (|c|^2 - 2 x.c): |x|^2 is the same for every centroid
        assign = torch.baddbmm((cent * cent).sum(-1).unsqueeze(1), x, cent.transpose(1, 2), alpha=-2).argmin(-1)
        counts = torch.zeros(s, k, device=x.device).scatter_add_(1, assign, ones)
        sums = torch.zeros(s, k, l, device=x.device).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, l), x)
        new_cent = torch.where(counts.unsqueeze(-1) > 0, sums / counts.clamp(min=1).unsqueeze(-1), cent)
        if torch.equal(new_cent, cent):
            break
        cent = new_cent
    return cent


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, layer: _PQBase, images, max_rows: int = 16384, batch_size: int = 256,
                 seed: int = 0) -> torch.Tensor:
    """The im2col rows ``layer`` sees when ``images`` run through ``model`` (a random subset of max_rows)."""
    gen = torch.Generator().manual_seed(seed)
    captured: list[torch.Tensor] = []

    def hook(mod, args):
        rows = mod.rows(args[0])
        captured.append(rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]])
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(images), batch_size):
            try:
                model(images[i:i + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
        model.train(was_training)
    rows = torch.cat(captured)
    return rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]


def calibrate_(model: nn.Module, images: torch.Tensor, *, max_rows: int = 8192, iters: int = 20,
               seed: int = 0, verbose: bool = False, inputs: str = "quantized") -> nn.Module:
    """k-means initialization of every PQ layer, in order, from the activations it actually sees.

    ``inputs="quantized"`` (default): layer i is calibrated on inputs produced by layers 0..i-1 already in PQ
    form (later layers are still exact), so each layer's prototypes match the activations it will meet at
    inference. ``"float"``: every layer is calibrated on the float network's activations (each layer's own
    quantization problem, as in a per-layer MSE study).
    """
    layers = pq_layers(model)
    if not layers:
        raise ValueError("calibrate_: the model has no PQ layers (call pq_convert_ first)")
    if not isinstance(images, torch.Tensor) or len(images) == 0:
        raise ValueError("calibrate_ needs a non-empty tensor of calibration inputs")
    if inputs not in MSE_INPUTS:
        raise ValueError(f"inputs must be one of {MSE_INPUTS}, got {inputs!r}")
    if inputs == "float":
        with exact_layers(model):
            rows = [layer_inputs(model, layer, images, max_rows=max_rows, seed=seed) for _, layer in layers]
        for (name, layer), r in zip(layers, rows):
            sub = F.pad(r, (0, layer.pad)).view(r.shape[0], layer.n_subspaces, -1)
            layer.set_prototypes(kmeans(sub.transpose(0, 1), layer.config.n_prototypes, iters=iters, seed=seed))
        return model
    for name, layer in layers:
        t0 = time.time()
        n_rows = calibrate_layer_(model, layer, images, max_rows=max_rows, iters=iters, seed=seed)
        if verbose:
            print(f"calibrated {name}: {n_rows} rows, {time.time() - t0:.1f}s")
    return model


def calibrate_layer_(model: nn.Module, layer: _PQBase, images: torch.Tensor, *, max_rows: int = 8192,
                     iters: int = 20, seed: int = 0) -> int:
    """k-means prototypes (and LUT = P . W) for one PQ layer of ``model`` from the inputs it sees there.

    Returns the number of im2col rows clustered."""
    rows = layer_inputs(model, layer, images, max_rows=max_rows, seed=seed)
    sub = torch.nn.functional.pad(rows, (0, layer.pad)).view(rows.shape[0], layer.n_subspaces, -1)
    layer.set_prototypes(kmeans(sub.transpose(0, 1), layer.config.n_prototypes, iters=iters, seed=seed))
    return rows.shape[0]


# ------------------------------------------------------------------------------------------- training
def _set_trainable(model: nn.Module, mode: str) -> list[nn.Parameter]:
    if mode not in TRAIN_MODES:
        raise ValueError(f"mode must be one of {TRAIN_MODES}, got {mode!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for _, layer in pq_layers(model):
        if mode in ("lut", "both"):
            params.append(layer.lut)
        if mode in ("prototypes", "prototypes_derived", "both"):
            params.append(layer.prototypes)
        layer.derive_lut = mode == "prototypes_derived"
    for p in params:
        p.requires_grad_(True)
    return params


def finetune_(model: nn.Module, data, *, mode: str = "both", epochs: float = 1.0, lr: float = 1e-3,
              batch_size: int = 128, seed: int = 0, teacher: nn.Module | None = None,
              max_seconds: float | None = None) -> dict:
    """Fine-tune the PQ tables (``mode``: one of ``TRAIN_MODES``; kmeans = no training) on (images, labels).

    ``prototypes_derived`` trains the prototypes only and recomputes every LUT from them (LUT = P . W) in each
    forward pass; at the end the derived tables are stored in ``lut``, so the model evaluates and saves as usual.

    Everything else stays frozen, BatchNorm included (eval statistics). The loss is cross-entropy on the
    labels, plus a KL term to ``teacher``'s logits when a float teacher is given. Adam with lr 1e-3: the
    paper's lr 0.01 (optimizer not stated) moved every LUT entry too far per Adam step in our runs.
    Returns {"steps", "seconds", "last_loss"}.
    """
    params = _set_trainable(model, mode)
    images, labels = data
    if mode == "kmeans" or epochs <= 0:
        for _, layer in pq_layers(model):
            layer.derive_lut = False
        return {"steps": 0, "seconds": 0.0, "last_loss": float("nan")}
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n_steps = max(1, int(epochs * len(images) / batch_size))
    model.eval()  # BN frozen; PQ layers switched to their training (soft) path below
    for _, layer in pq_layers(model):
        layer.train()
    t0, loss = time.time(), torch.tensor(float("nan"))
    perm = torch.randperm(len(images), generator=gen)
    step = 0
    for step in range(n_steps):
        start = (step * batch_size) % len(images)
        if start + batch_size > len(images):
            perm = torch.randperm(len(images), generator=gen)
            start = 0
        idx = perm[start:start + batch_size]
        logits = model(images[idx])
        loss = F.cross_entropy(logits, labels[idx])
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(images[idx])
            loss = loss + F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                                   reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for _, layer in pq_layers(model):  # keep padded prototype coordinates at zero
            if layer.prototypes.grad is not None:
                layer.prototypes.grad.mul_(layer.proto_mask)
        opt.step()
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    model.eval()
    for _, layer in pq_layers(model):
        if layer.derive_lut:  # freeze the derived tables into the LUT parameter
            with torch.no_grad():
                layer.lut.copy_(layer.lut_from_weight())
            layer.derive_lut = False
    for p in model.parameters():
        p.requires_grad_(True)
    return {"steps": step + 1, "seconds": time.time() - t0, "last_loss": float(loss.detach())}


def train_float(model: nn.Module, data, *, epochs: float = 2.0, lr: float = 2e-3, batch_size: int = 128,
                weight_decay: float = 5e-4, seed: int = 0, augment=None, max_seconds: float | None = None,
                verbose: bool = False) -> dict:
    """Train a plain float model with AdamW and a one-cycle schedule; ``augment(images, gen)`` optional."""
    images, labels = data
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    n_steps = max(1, int(epochs * len(images) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n_steps, pct_start=0.2)
    model.train()
    t0, step = time.time(), 0
    perm = torch.randperm(len(images), generator=gen)
    pos = 0
    for step in range(n_steps):
        if pos + batch_size > len(images):
            perm, pos = torch.randperm(len(images), generator=gen), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x = images[idx]
        if augment is not None:
            x = augment(x, gen)
        loss = F.cross_entropy(model(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if verbose and step % 100 == 0:
            print(f"step {step}/{n_steps} loss {loss.item():.3f} {time.time() - t0:.0f}s")
        if max_seconds is not None and time.time() - t0 > max_seconds:
            break
    model.eval()
    return {"steps": step + 1, "seconds": time.time() - t0, "last_loss": float(loss.detach())}


@torch.no_grad()
def accuracy(model: nn.Module, data, batch_size: int = 512) -> float:
    """Top-1 accuracy (%) of ``model`` on (images, labels), in eval mode (hard PQ assignment)."""
    images, labels = data
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"accuracy needs matching non-empty images/labels, got {len(images)}/{len(labels)}")
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += (model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum().item()
    model.train(was)
    return 100.0 * correct / len(images)


class exact_layers:
    """Context manager: every PQ layer of ``model`` computes its exact dense layer inside the block (the float
    network, as long as nothing else was changed)."""

    def __init__(self, model: nn.Module):
        self.layers = [layer for _, layer in pq_layers(model)]

    def __enter__(self):
        self.flags = [bool(layer.calibrated) for layer in self.layers]
        for layer in self.layers:
            layer.calibrated.fill_(False)
        return self

    def __exit__(self, *exc):
        for layer, flag in zip(self.layers, self.flags):
            layer.calibrated.fill_(flag)
        return False


MSE_INPUTS = ("quantized", "float")


@torch.no_grad()
def layer_mse(model: nn.Module, images: torch.Tensor, inputs: str = "quantized") -> dict[str, float]:
    """Per PQ layer: mean squared error of the PQ output vs the exact dense output on the same input.

    ``inputs``: "quantized" = the rows the layer sees in the PQ model (the layers before it already PQ);
    "float" = the rows it sees in the float network (every PQ layer exact while they are captured), so the
    error is the layer's own, as the paper's MSE-vs-N_p study measures it."""
    if inputs not in MSE_INPUTS:
        raise ValueError(f"inputs must be one of {MSE_INPUTS}, got {inputs!r}")
    out = {}
    for name, layer in pq_layers(model):
        if inputs == "float":
            with exact_layers(model):
                rows = layer_inputs(model, layer, images, max_rows=8192)
        else:
            rows = layer_inputs(model, layer, images, max_rows=8192)
        exact = rows @ layer.weight_2d.t()
        if layer.bias is not None:
            exact = exact + layer.bias
        was = layer.training
        layer.eval()
        out[name] = float(((layer.forward_rows(rows) - exact) ** 2).mean())
        layer.train(was)
    return out


def mean_layer_mse(model: nn.Module, images: torch.Tensor, inputs: str = "quantized") -> float:
    """``layer_mse`` averaged over the model's PQ layers (one number per model, as the sweeps tabulate it);
    NaN for a model without PQ layers."""
    values = list(layer_mse(model, images, inputs).values())
    return sum(values) / len(values) if values else float("nan")


# ------------------------------------------------------------------------------------ the "e2e" recipe
# PECAN / LUT-NN style: progressive conversion, then end-to-end fine-tuning of everything that is still a
# parameter (PQ tables, BatchNorm, the dense stem and classifier) with knowledge distillation, data
# augmentation, a warmup + cosine learning rate and (optionally) tau annealing; BN statistics re-estimated.
def augment_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image CIFAR augmentation: a random crop of the zero-padded image (``pad`` px on each side), then
    a random horizontal flip, done as one gather on ``x``'s device.

    Unlike ``cnn.flip_crop`` (one crop offset per batch), every image gets its own offset. The random draws
    come from the CPU generator ``gen``, so a seed gives the same crops on any device.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"augment_crop_flip expects images [B, C, H, W], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    b, _, h, w = x.shape
    offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip[:, None], (w - 1) - cols, cols) + offsets[1][:, None]  # [B, W]
    rows = torch.arange(h) + offsets[0][:, None]                                     # [B, H]
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    out = padded[torch.arange(b, device=dev)[:, None, None], :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channel last: [B, H, W, C]


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
                 temperature: float = 4.0, alpha: float = 0.9) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): ``(1 - alpha) * CE(logits, labels)
    + alpha * T^2 * KL(softmax(teacher / T) || softmax(logits / T))``; plain CE without a teacher."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    ce = F.cross_entropy(logits, labels)
    if teacher_logits is None or alpha == 0:
        return ce
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match {tuple(logits.shape)}")
    t = temperature
    kd = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits.detach() / t, -1),
                  log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * t * t * kd


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, images: torch.Tensor, *, batch_size: int = 256,
                    max_images: int = 4096) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance from ``images`` passed through the model as
    it now is (PQ layers with the hard, inference-time assignment): a cumulative average over the batches.

    After product quantization a layer's outputs no longer have the statistics its BN was trained on;
    this is the cheap fix (no gradient). Leaves the model in eval mode."""
    if not isinstance(images, torch.Tensor) or len(images) == 0:
        raise ValueError("recalibrate_bn_ needs a non-empty tensor of images")
    bns = [bn for bn in _batchnorms(model) if bn.track_running_stats]
    if not bns:
        return model
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches below
        bn.train()
    n = min(len(images), max_images)
    try:
        for i in range(0, n, batch_size):
            model(images[i:min(i + batch_size, n)])
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.eval()
    return model


def finetune_e2e_(model: nn.Module, data, *, teacher: nn.Module | None = None, epochs: float = 10.0,
                  lr: float = 1e-3, batch_size: int = 128, augment=None, kd_temperature: float = 4.0,
                  kd_alpha: float = 0.9, train_bn: bool = True, train_dense: bool = True,
                  tau: tuple[float, float] | None = None, warmup: float = 0.05, seed: int = 0,
                  max_seconds: float | None = None) -> dict:
    """Fine-tune a (partly) PQ model end to end; returns {"steps", "seconds", "last_loss"}.

    Trained: every PQ layer's LUT, prototypes (padded coordinates held at zero) and bias; with ``train_bn``
    the BatchNorm affine parameters, with batch statistics in the forward pass, and the running statistics
    re-estimated on un-augmented training images at the end (``recalibrate_bn_``); with ``train_dense``
    every other parameter (the dense stem and classifier, layers not converted yet). Loss: ``distill_loss``
    against the float ``teacher`` (CE only without one). ``augment(images, generator)`` is applied to each
    batch (the teacher sees the same augmented batch). Adam, linear warmup over ``warmup`` of the steps, then
    cosine decay to 0. ``tau=(start, end)`` anneals every PQ layer's softmax temperature geometrically from
    soft to hard over the run (with straight-through layers it shapes only the gradient); None keeps it.
    """
    images, labels = data
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"finetune_e2e_ needs matching non-empty images/labels, got {len(images)}/{len(labels)}")
    layers = pq_layers(model)
    if not layers:
        raise ValueError("finetune_e2e_: the model has no PQ layers (call pq_convert_ or progressive_convert_)")
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup!r}")
    if tau is not None and (len(tau) != 2 or not all(t > 0 for t in tau)):
        raise ValueError(f"tau must be None or a pair (start, end) of positive temperatures, got {tau!r}")
    if epochs <= 0:
        return {"steps": 0, "seconds": 0.0, "last_loss": float("nan")}
    for p in model.parameters():
        p.requires_grad_(False)
    tables = [p for _, layer in layers for p in (layer.lut, layer.prototypes, layer.bias) if p is not None]
    bn_params = [p for bn in _batchnorms(model) for p in bn.parameters(recurse=False)] if train_bn else []
    seen = {id(p) for p in tables} | {id(p) for bn in _batchnorms(model) for p in bn.parameters(recurse=False)}
    dense = [p for p in model.parameters() if id(p) not in seen] if train_dense else []
    params = tables + bn_params + dense
    for p in params:
        p.requires_grad_(True)
    n_steps = max(1, int(epochs * len(images) / batch_size))
    n_warm = int(warmup * n_steps)
    opt = torch.optim.Adam(params, lr=lr)

    def lr_factor(step: int) -> float:
        if step < n_warm:
            return (step + 1) / n_warm
        return 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, n_steps - n_warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed)
    if teacher is not None:
        teacher.eval()
    model.eval()
    for _, layer in layers:
        layer.train()  # soft / straight-through assignment
    if train_bn:
        for bn in _batchnorms(model):
            bn.train()
    t0, loss, step, pos = time.time(), torch.tensor(float("nan")), 0, 0
    perm = torch.randperm(len(images), generator=gen)
    try:
        for step in range(n_steps):
            if tau is not None:
                set_tau_(model, tau[0] * (tau[1] / tau[0]) ** (step / max(1, n_steps - 1)))
            if pos + batch_size > len(images):
                perm, pos = torch.randperm(len(images), generator=gen), 0
            idx = perm[pos:pos + batch_size].to(images.device)
            pos += batch_size
            x = images[idx]
            if augment is not None:
                x = augment(x, gen)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
            loss = distill_loss(model(x), t_logits, labels[idx], temperature=kd_temperature, alpha=kd_alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for _, layer in layers:  # keep padded prototype coordinates at zero
                if layer.prototypes.grad is not None:
                    layer.prototypes.grad.mul_(layer.proto_mask)
            opt.step()
            sched.step()
            if max_seconds is not None and time.time() - t0 > max_seconds:
                break
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    if train_bn:
        recalibrate_bn_(model, images, batch_size=max(batch_size, 256))
    return {"steps": step + 1, "seconds": time.time() - t0, "last_loss": float(loss.detach())}


def eligible_layers(model: nn.Module, config: PQConfig, *, skip=(), skip_roles=ROLES,
                    min_in_features: int = 1) -> list[str]:
    """Names of the layers ``pq_convert_(model, config, skip=skip)`` would convert, in definition order."""
    probe = pq_convert_(copy.deepcopy(model), config, skip=skip, skip_roles=skip_roles,
                        min_in_features=min_in_features)
    return [name for name, _ in pq_layers(probe)]


def progressive_convert_(model: nn.Module, config: PQConfig, data, *, teacher: nn.Module | None = None,
                         calib_images: torch.Tensor | None = None, epochs_per_layer: float = 0.25,
                         skip=(), skip_roles=ROLES, min_in_features: int = 1, calib_rows: int = 8192,
                         seed: int = 0, verbose: bool = False, **finetune_kw) -> dict:
    """Convert a plain model to PQ one layer at a time, from the input side (definition order).

    For each eligible layer (exactly those ``pq_convert_`` would convert): replace it by its PQ version built
    from its *current* weights, k-means-calibrate it on the activations the already-PQ prefix produces, then
    fine-tune the whole model for ``epochs_per_layer`` with ``finetune_e2e_`` (``finetune_kw`` are passed
    on: lr, batch_size, augment, kd_temperature, ...). The layers still dense keep training, so they learn
    to absorb the quantization error of the layers before them. ``teacher`` defaults to a frozen copy of
    the model as given. Returns {"layers", "steps", "seconds"}.
    """
    if pq_layers(model):
        raise ValueError("progressive_convert_ expects a plain model (it already has PQ layers)")
    images = data[0]
    calib = images[:2048] if calib_images is None else calib_images
    if teacher is None:
        teacher = copy.deepcopy(model).eval()
    names = eligible_layers(model, config, skip=skip, skip_roles=skip_roles, min_in_features=min_in_features)
    t0, steps = time.time(), 0
    for i, name in enumerate(names):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        dense = getattr(parent, attr)
        layer = (PQConv2d if isinstance(dense, nn.Conv2d) else PQLinear).from_dense(dense, config)
        setattr(parent, attr, layer)
        calibrate_layer_(model, layer, calib, max_rows=calib_rows, seed=seed)
        if epochs_per_layer > 0:
            steps += finetune_e2e_(model, data, teacher=teacher, epochs=epochs_per_layer, seed=seed + i,
                                   **finetune_kw)["steps"]
        if verbose:
            print(f"progressive: {name} converted ({i + 1}/{len(names)}), {time.time() - t0:.0f}s")
    return {"layers": names, "steps": steps, "seconds": time.time() - t0}
