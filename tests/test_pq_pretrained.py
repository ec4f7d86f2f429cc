"""The Keras .h5 loader (effllm_lib.pq.keras_cnn) and the pretrained-CNN PQ experiment (effllm_lib.pq.pretrained).

The loader is checked against an independent NumPy implementation of the Keras forward pass (NHWC, HWIO
kernels, conv -> activation -> BN, NHWC flatten) on a synthetic .h5 written with h5py.
"""
import json

import h5py
import numpy as np
import pytest
import torch

from effllm_lib.pq import PQConfig, calibrate_, pq_convert_
from effllm_lib.pq import fast, pretrained
from effllm_lib.pq.keras_cnn import KerasCNNError, load_keras_cifar_cnn, to_input


# ----------------------------------------------------------------------------------- synthetic Keras file
def _conv(name, filters, padding="valid", activation="relu"):
    return {"class_name": "Conv2D", "config": {"name": name, "filters": filters, "kernel_size": [3, 3],
                                               "strides": [1, 1], "padding": padding, "activation": activation,
                                               "data_format": "channels_last", "use_bias": True}}


def _bn(name, eps):
    return {"class_name": "BatchNormalization", "config": {"name": name, "axis": [3], "epsilon": eps,
                                                           "momentum": 0.99, "center": True, "scale": True}}


def _pool(name, size):
    return {"class_name": "MaxPooling2D", "config": {"name": name, "pool_size": [size, size],
                                                     "strides": [size, size], "padding": "valid",
                                                     "data_format": "channels_last"}}


def _dense(name, units, activation):
    return {"class_name": "Dense", "config": {"name": name, "units": units, "activation": activation,
                                              "use_bias": True}}


def _layers_small(hw):
    """conv(valid, relu) BN pool2 conv(same, linear) BN flatten dense(relu) dropout dense(linear)."""
    return [
        {"class_name": "InputLayer", "config": {"name": "input", "batch_input_shape": [None, hw, hw, 3]}},
        _conv("conv2d", 4), _bn("batch_normalization", 1e-3), _pool("max_pooling2d", 2),
        _conv("conv2d_1", 5, padding="same", activation="linear"), _bn("batch_normalization_1", 0.01),
        {"class_name": "Flatten", "config": {"name": "flatten", "data_format": "channels_last"}},
        _dense("dense", 6, "relu"),
        {"class_name": "Dropout", "config": {"name": "dropout", "rate": 0.2}},
        _dense("dense_1", 3, "linear"),
    ]


def _random_weights(layers, hw, seed=0):
    """{layer name: {weight name: array}} with Keras layouts, following the shapes through the network."""
    rng = np.random.default_rng(seed)
    weights, c, h = {}, 3, hw
    flat = None
    for layer in layers:
        kind, cfg = layer["class_name"], layer["config"]
        if kind == "Conv2D":
            f = cfg["filters"]
            weights[cfg["name"]] = {"kernel": rng.normal(0, 0.4, (3, 3, c, f)).astype(np.float32),
                                    "bias": rng.normal(0, 0.1, f).astype(np.float32)}
            c, h = f, (h - 2 if cfg["padding"] == "valid" else h)
        elif kind == "BatchNormalization":
            weights[cfg["name"]] = {"gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
                                    "beta": rng.normal(0, 0.2, c).astype(np.float32),
                                    "moving_mean": rng.normal(0, 0.3, c).astype(np.float32),
                                    "moving_variance": rng.uniform(0.2, 2.0, c).astype(np.float32)}
        elif kind == "MaxPooling2D":
            h //= cfg["pool_size"][0]
        elif kind == "Flatten":
            flat = c * h * h
        elif kind == "Dense":
            n_in = flat
            weights[cfg["name"]] = {"kernel": rng.normal(0, 0.3, (n_in, cfg["units"])).astype(np.float32),
                                    "bias": rng.normal(0, 0.1, cfg["units"]).astype(np.float32)}
            flat = cfg["units"]
    return weights


def _write_h5(path, layers, weights, with_config=True):
    order = {"Conv2D": ("kernel", "bias"), "Dense": ("kernel", "bias"),
             "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance")}
    with h5py.File(path, "w") as f:
        if with_config:
            f.attrs["model_config"] = json.dumps({"class_name": "Sequential",
                                                  "config": {"name": "sequential", "layers": layers}})
        f.attrs["keras_version"] = "2.9.0"
        mw = f.create_group("model_weights")
        for layer in layers:
            kind, name = layer["class_name"], layer["config"]["name"]
            g = mw.create_group(name)
            names = [f"{name}/{w}:0" for w in order.get(kind, ())]
            g.attrs["weight_names"] = np.array([n.encode() for n in names], dtype=object) if names else \
                np.array([], dtype=np.float64)
            for w, full in zip(order.get(kind, ()), names):
                g.create_dataset(full, data=weights[name][w])
    return path


def _numpy_keras_forward(x_nhwc, layers, weights):
    """Keras inference semantics in NumPy, written from the Keras definitions (no torch)."""
    x = x_nhwc.astype(np.float64)
    for layer in layers:
        kind, cfg = layer["class_name"], layer["config"]
        w = weights.get(cfg.get("name"), {})
        if kind == "Conv2D":
            k, b = w["kernel"].astype(np.float64), w["bias"]
            if cfg["padding"] == "same":
                x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
            n, h, wd, _ = x.shape
            out = np.zeros((n, h - 2, wd - 2, k.shape[3]))
            for i in range(h - 2):
                for j in range(wd - 2):
                    out[:, i, j, :] = np.einsum("nhwc,hwcf->nf", x[:, i:i + 3, j:j + 3, :], k)
            x = out + b
        elif kind == "BatchNormalization":
            x = (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + cfg["epsilon"]) * w["gamma"] + w["beta"]
        elif kind == "MaxPooling2D":
            s = cfg["pool_size"][0]
            n, h, wd, c = x.shape
            x = x[:, :h // s * s, :wd // s * s].reshape(n, h // s, s, wd // s, s, c).max(axis=(2, 4))
        elif kind == "Flatten":
            x = x.reshape(len(x), -1)  # NHWC order
        elif kind == "Dense":
            x = x @ w["kernel"] + w["bias"]
        if cfg.get("activation") == "relu":
            x = np.maximum(x, 0)
    return x


# ----------------------------------------------------------------------------------------------- loader
def test_loader_matches_numpy_keras_forward(tmp_path):
    layers = _layers_small(8)
    weights = _random_weights(layers, 8, seed=1)
    path = _write_h5(tmp_path / "m.h5", layers, weights)
    model = load_keras_cifar_cnn(path)
    x = np.random.default_rng(2).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        got = model(to_input(x)).numpy()
    ref = _numpy_keras_forward(x, layers, weights)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert model.batch_normalization_1.eps == pytest.approx(0.01)  # eps read from the file
    # a wrong flatten order (NCHW) would give different numbers: guard that the test can see it
    w = _random_weights(layers, 8, seed=1)
    w["dense"]["kernel"] = w["dense"]["kernel"][np.random.default_rng(0).permutation(45)]
    assert not np.allclose(_numpy_keras_forward(x, layers, w), ref, atol=1e-3)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_keras_cifar_cnn(tmp_path / "nope.h5")
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"this is not hdf5")
    with pytest.raises(KerasCNNError, match="HDF5"):
        load_keras_cifar_cnn(bad)
    layers = _layers_small(8)
    weights = _random_weights(layers, 8)
    with pytest.raises(KerasCNNError, match="model_config"):
        load_keras_cifar_cnn(_write_h5(tmp_path / "w.h5", layers, weights, with_config=False))
    weights["dense"]["kernel"] = weights["dense"]["kernel"][:40]  # does not fit the 45 flattened features
    with pytest.raises(KerasCNNError, match="do not fit"):
        load_keras_cifar_cnn(_write_h5(tmp_path / "s.h5", layers, weights))
    with pytest.raises(ValueError, match="NHWC"):
        to_input(np.zeros((2, 3, 8, 8), np.uint8))


# ------------------------------------------------------------------------------------------- experiment
def test_split_indices_disjoint_and_seeded():
    a, b = pretrained.split_indices(101, seed=3)
    assert len(a) == 50 and len(b) == 51
    assert not set(a) & set(b) and sorted(set(a) | set(b)) == list(range(101))
    a2, _ = pretrained.split_indices(101, seed=3)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, pretrained.split_indices(101, seed=4)[0])
    with pytest.raises(ValueError):
        pretrained.split_indices(1)


def _tiny_cifar_file(tmp_path):
    """A 32x32 network with the packaged model's layer names: conv2d (stem), conv2d_1 (PQ), dense."""
    layers = [_conv("conv2d", 4), _bn("batch_normalization", 1e-3), _pool("max_pooling2d", 2),
              _conv("conv2d_1", 4), _bn("batch_normalization_1", 1e-3), _pool("max_pooling2d_1", 4),
              {"class_name": "Flatten", "config": {"name": "flatten"}}, _dense("dense", 10, "linear")]
    weights = _random_weights(layers, 32, seed=5)
    weights["conv2d"]["kernel"] /= 100.0  # raw 0..255 input
    return _write_h5(tmp_path / "tiny.h5", layers, weights)


def test_fast_inference_copy_matches_layer_path(tmp_path, one_thread):
    model = load_keras_cifar_cnn(_tiny_cifar_file(tmp_path))
    x = to_input(np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    pq_convert_(model, PQConfig(8, 9), skip=pretrained.dense_layers(model))
    calibrate_(model, x)
    with torch.no_grad():
        ref, got = model.eval()(x), fast.fast_inference_copy(model)(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_pretrained_pq_runs_and_never_tunes_on_held_out(tmp_path, monkeypatch, one_thread):
    path = _tiny_cifar_file(tmp_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)
    seen = []  # every image tensor handed to a calibration / training function

    def spy(fn, pos):
        def wrapped(*args, **kw):
            arg = args[pos]
            seen.append((arg[0] if isinstance(arg, tuple) else arg).clone())
            if "calib_images" in kw and kw["calib_images"] is not None:
                seen.append(kw["calib_images"].clone())
            return fn(*args, **kw)
        return wrapped

    # position of the images / (images, labels) argument of each function the experiment calls
    for name, pos in {"calibrate_": 1, "finetune_": 1, "finetune_e2e_": 1, "progressive_convert_": 2,
                      "recalibrate_bn_": 1}.items():
        monkeypatch.setattr(pretrained, name, spy(getattr(pretrained, name), pos))
    scale = pretrained.PretrainedScale(images="ci", n_kmeans=8, tables_epochs=0.5, e2e_epochs=0.5,
                                       e2e_layer_epochs=0.25, n_mse=4, kmeans_rows=512, batch_size=8)
    df = pretrained.pretrained_pq(scale, n_prototypes=4, subvec_len=9, model_path=path, images=images,
                                  labels=labels)
    assert set(df.stage) == {"float", "kmeans", "kmeans_bn", "tables", "e2e"}
    assert df.accuracy.between(0, 100).all() and df.float_accuracy.between(0, 100).all()
    assert (df[df.stage != "float"].pq_layers == 1).all()  # only conv2d_1: stem and dense stay dense
    calib, held = df.attrs["calib_index"], df.attrs["held_out_index"]
    assert not set(calib) & set(held) and len(calib) + len(held) == 40
    assert df.set_index(["stage", "eval_set"]).loc[("float", "all"), "n_images"] == 40
    assert (df[df.eval_set == "held_out"].n_images == len(held)).all()
    # no held-out image ever reached calibration or fine-tuning (the batches are augmented copies, so check
    # the tensors handed to the functions)
    held_bytes = {to_input(images[i:i + 1])[0].numpy().tobytes() for i in held}
    calib_bytes = {to_input(images[i:i + 1])[0].numpy().tobytes() for i in calib}
    assert seen
    for t in seen:
        for img in t:
            b = img.numpy().tobytes()
            assert b in calib_bytes and b not in held_bytes


def test_pretrained_pq_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        pretrained.pretrained_pq("huge")


@pytest.mark.slow
def test_packaged_model_and_ci_experiment(tmp_path):
    """The real .h5 on the committed 300-image slice: float accuracy near the published 80%, sane PQ rows."""
    from effllm_lib import assets

    images, labels = assets.cifar10_test("ci")
    model = load_keras_cifar_cnn()
    with torch.no_grad():
        acc = (model(to_input(images)).argmax(-1).numpy() == labels).mean() * 100
    assert 72 <= acc <= 88
    df = pretrained.pretrained_pq("ci")
    assert df.accuracy.between(0, 100).all()
    held = df[df.eval_set == "held_out"].set_index("stage").accuracy
    assert held["float"] > held["kmeans"] > 10  # PQ loses accuracy but is far better than chance
