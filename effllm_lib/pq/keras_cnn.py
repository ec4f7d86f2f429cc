"""The packaged pretrained CIFAR-10 CNN (pip ``cifar-10-model`` 7.4.0, a Keras 2.9 .h5) in plain torch.

    model = load_keras_cifar_cnn()                       # assets.cifar10_keras_h5() by default
    x = to_input(images_uint8)                           # uint8 NHWC -> float NCHW in 0..255 (no normalization)
    model(x)                                             # [N, 10] scores

The architecture is read from the file's ``model_config`` (Keras Sequential JSON), the weights from
``model_weights/<layer>/<weight name>`` as listed in each layer group's ``weight_names`` attribute, so the
torch model mirrors exactly what the file describes. The packaged file is

    conv2d   3->64  3x3 valid, relu, BN | conv2d_1 64->64, relu, BN | maxpool 2      32 -> 30 -> 28 -> 14
    conv2d_2 64->128, relu, BN | conv2d_3 128->128, relu, BN | maxpool 2                  -> 12 -> 10 -> 5
    conv2d_4 128->64, relu, BN | conv2d_5 64->64, relu, BN | maxpool 1 (identity)         -> 3 -> 1
    flatten (64) | dense 1024 relu | dropout .2 | dense_1 512 relu | dropout .2 | dense_2 10 relu

Keras applies a Conv2D's activation before the BatchNormalization that follows it (conv -> relu -> BN), and
the last Dense layer has a ReLU too (the "logits" are clipped at 0; kept, as the file says so: argmax over
tied zeros picks the first class, as NumPy's does). Weight layouts: conv kernels HWIO -> OIHW, dense
(in, out) -> (out, in), BatchNorm gamma/beta/moving mean/variance with the file's epsilon (Keras default
1e-3). Keras flattens NHWC, so the torch model permutes to channels-last before flattening (a no-op for
this file's 1x1x64 map, but not in general).

The torch modules keep the Keras layer names (``conv2d``, ``batch_normalization_3``, ``dense_1``, ...), so
``pq_convert_(model, cfg, skip=pretrained.dense_layers(model))`` leaves the stem (by its role, the first
conv) and every dense layer dense.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"linear": None, "relu": F.relu, "softmax": lambda x: F.softmax(x, -1)}
_IGNORED = {"InputLayer"}  # (Dropout is kept as nn.Dropout: identity at inference, active in training)


class KerasCNNError(RuntimeError):
    """The .h5 file is missing, unreadable, or describes something this loader does not map."""


def to_input(images) -> torch.Tensor:
    """uint8 (or float 0..255) images [N, 32, 32, 3] (NHWC) -> float32 NCHW tensor, raw 0..255 scale,
    the input this network was trained on (no mean/std normalization)."""
    x = torch.as_tensor(np.asarray(images))
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images [N, H, W, 3], got shape {tuple(x.shape)}")
    return x.float().permute(0, 3, 1, 2).contiguous()


class KerasSequentialCNN(nn.Module):
    """A Keras Sequential CNN (Conv2D / BatchNormalization / MaxPooling2D / Flatten / Dense / Dropout /
    Activation) in torch; NCHW float input. Submodules are named after the Keras layers."""

    def __init__(self, layers: list[dict]):
        super().__init__()
        self.order: list[tuple[str, str, str | None]] = []  # (kind, name, activation)
        for layer in layers:
            kind, cfg = layer["class_name"], layer["config"]
            name = cfg["name"]
            if kind in _IGNORED:
                continue
            if cfg.get("data_format", "channels_last") != "channels_last":
                raise KerasCNNError(f"layer {name}: only channels_last models are supported")
            act = cfg.get("activation")
            if act is not None and act not in ACTIVATIONS:
                raise KerasCNNError(f"layer {name}: unsupported activation {act!r}")
            if kind == "Conv2D":
                k, s = tuple(cfg["kernel_size"]), tuple(cfg["strides"])
                if tuple(cfg.get("dilation_rate", (1, 1))) != (1, 1) or cfg.get("groups", 1) != 1:
                    raise KerasCNNError(f"layer {name}: dilated / grouped convolutions are not supported")
                if cfg["padding"] == "valid":
                    pad = 0
                elif cfg["padding"] == "same" and s == (1, 1) and all(v % 2 == 1 for v in k):
                    pad = (k[0] // 2, k[1] // 2)  # symmetric for stride 1 and odd kernels
                else:
                    raise KerasCNNError(f"layer {name}: padding {cfg['padding']!r} with strides {s} and kernel "
                                        f"{k} is not supported")
                # in_channels is set when the weights are loaded (LazyConv2d would complicate deepcopy)
                module = nn.Conv2d(1, cfg["filters"], k, stride=s, padding=pad, bias=cfg.get("use_bias", True))
            elif kind == "BatchNormalization":
                axis = cfg.get("axis", -1)
                axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
                if axis not in (-1, 3):
                    raise KerasCNNError(f"layer {name}: BatchNormalization over axis {axis} is not supported")
                if not (cfg.get("center", True) and cfg.get("scale", True)):
                    raise KerasCNNError(f"layer {name}: BatchNormalization without center/scale is not supported")
                # num_features set at load time; torch momentum = 1 - Keras momentum
                module = nn.BatchNorm2d(1, eps=float(cfg.get("epsilon", 1e-3)),
                                        momentum=1.0 - float(cfg.get("momentum", 0.99)))
            elif kind == "MaxPooling2D":
                pool = tuple(cfg["pool_size"])
                stride = tuple(cfg.get("strides") or pool)
                if cfg.get("padding", "valid") != "valid":
                    raise KerasCNNError(f"layer {name}: only 'valid' max pooling is supported")
                module = nn.MaxPool2d(pool, stride)
            elif kind == "Flatten":
                module = None
            elif kind == "Dense":
                module = nn.Linear(1, cfg["units"], bias=cfg.get("use_bias", True))
            elif kind == "Dropout":
                module = nn.Dropout(float(cfg["rate"]))
            elif kind == "Activation":
                module = None
            else:
                raise KerasCNNError(f"layer {name}: Keras layer type {kind!r} is not supported")
            if module is not None:
                self.add_module(name, module)
            self.order.append((kind, name, act))
        if not any(kind == "Dense" for kind, _, _ in self.order):
            raise KerasCNNError("the model has no Dense layer")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, name, act in self.order:
            if kind == "Flatten":
                x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens NHWC
            elif kind != "Activation":
                x = getattr(self, name)(x)
            if act is not None and ACTIVATIONS[act] is not None:
                x = ACTIVATIONS[act](x)
        return x


def _read_config(f) -> list[dict]:
    raw = f.attrs.get("model_config")
    if raw is None:
        raise KerasCNNError("no 'model_config' attribute: not a full Keras model file (weights-only files "
                            "carry no architecture)")
    cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    if cfg.get("class_name") != "Sequential":
        raise KerasCNNError(f"only Keras Sequential models are supported, got {cfg.get('class_name')!r}")
    layers = cfg["config"]["layers"] if isinstance(cfg["config"], dict) else cfg["config"]
    return layers


def _weights(group, name: str) -> dict[str, np.ndarray]:
    """{short name ('kernel', 'bias', 'gamma', ...): array} of one layer group."""
    if name not in group:
        raise KerasCNNError(f"no weights for layer {name!r} in the file")
    g = group[name]
    out = {}
    for wname in g.attrs.get("weight_names", []):
        wname = wname.decode() if isinstance(wname, bytes) else str(wname)
        short = wname.rsplit("/", 1)[-1].split(":", 1)[0]
        out[short] = np.asarray(g[wname], dtype=np.float32)
    return out


def _set(param: torch.Tensor, value: np.ndarray, what: str) -> None:
    if tuple(param.shape) != tuple(value.shape):
        raise KerasCNNError(f"{what}: shape {tuple(value.shape)} does not fit {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.ascontiguousarray(value)))


def load_keras_cifar_cnn(path: str | Path | None = None) -> KerasSequentialCNN:
    """The Keras .h5 at ``path`` (default: ``assets.cifar10_keras_h5()``) as a torch module in eval mode.

    Raises FileNotFoundError for a missing file and KerasCNNError for one that is not a readable Keras
    Sequential model with matching weights."""
    import h5py

    if path is None:
        from .. import assets
        path = assets.cifar10_keras_h5()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Keras model file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise KerasCNNError(f"{path} is not a readable HDF5 file ({exc})") from exc
    with f:
        try:
            layers = _read_config(f)
        except (KeyError, TypeError, ValueError) as exc:
            raise KerasCNNError(f"{path}: cannot parse model_config ({exc!r})") from exc
        model = KerasSequentialCNN(layers)
        group = f["model_weights"] if "model_weights" in f else f
        for kind, name, _ in model.order:
            if kind == "Conv2D":
                w = _weights(group, name)
                if "kernel" not in w:
                    raise KerasCNNError(f"layer {name}: no kernel in the file")
                kernel = w["kernel"]  # [H, W, Cin, Cout]
                conv = getattr(model, name)
                if kernel.ndim != 4 or kernel.shape[3] != conv.out_channels:
                    raise KerasCNNError(f"layer {name}: kernel shape {kernel.shape} does not match "
                                        f"{conv.out_channels} filters")
                new = nn.Conv2d(kernel.shape[2], conv.out_channels, conv.kernel_size, conv.stride,
                                conv.padding, bias=conv.bias is not None)
                _set(new.weight, kernel.transpose(3, 2, 0, 1), f"{name}/kernel")
                if new.bias is not None:
                    _set(new.bias, w["bias"], f"{name}/bias")
                setattr(model, name, new)
            elif kind == "BatchNormalization":
                w = _weights(group, name)
                missing = {"gamma", "beta", "moving_mean", "moving_variance"} - set(w)
                if missing:
                    raise KerasCNNError(f"layer {name}: missing {sorted(missing)} in the file")
                old = getattr(model, name)
                bn = nn.BatchNorm2d(len(w["gamma"]), eps=old.eps, momentum=old.momentum)
                _set(bn.weight, w["gamma"], f"{name}/gamma")
                _set(bn.bias, w["beta"], f"{name}/beta")
                _set(bn.running_mean, w["moving_mean"], f"{name}/moving_mean")
                _set(bn.running_var, w["moving_variance"], f"{name}/moving_variance")
                setattr(model, name, bn)
            elif kind == "Dense":
                w = _weights(group, name)
                if "kernel" not in w:
                    raise KerasCNNError(f"layer {name}: no kernel in the file")
                kernel = w["kernel"]  # [in, out]
                old = getattr(model, name)
                if kernel.ndim != 2 or kernel.shape[1] != old.out_features:
                    raise KerasCNNError(f"layer {name}: kernel shape {kernel.shape} does not match "
                                        f"{old.out_features} units")
                new = nn.Linear(kernel.shape[0], old.out_features, bias=old.bias is not None)
                _set(new.weight, kernel.T, f"{name}/kernel")
                if new.bias is not None:
                    _set(new.bias, w["bias"], f"{name}/bias")
                setattr(model, name, new)
    model.eval()
    shape = _input_shape(layers)
    if shape is not None:  # a probe forward: shapes that do not chain (e.g. a dense kernel for another flatten)
        try:
            with torch.no_grad():
                model(torch.zeros(1, shape[2], shape[0], shape[1]))
        except RuntimeError as exc:
            raise KerasCNNError(f"{path}: the weights do not fit the architecture for input {shape} "
                                f"({str(exc).splitlines()[0]})") from exc
    return model


def _input_shape(layers: list[dict]) -> tuple[int, int, int] | None:
    """(H, W, C) from the first ``batch_input_shape`` in the config, or None."""
    for layer in layers:
        shape = layer["config"].get("batch_input_shape")
        if shape is not None and len(shape) == 4 and all(isinstance(v, int) for v in shape[1:]):
            return tuple(shape[1:])
    return None


def conv_and_dense_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(conv layer names, dense layer names) of a loaded model, in forward order."""
    convs = [n for n, m in model.named_children() if isinstance(m, nn.Conv2d)]
    dense = [n for n, m in model.named_children() if isinstance(m, nn.Linear)]
    return convs, dense
