"""The e2e PQ training pieces (effllm_lib.pq.train) at tiny scale, and the sweep plumbing that runs them."""
import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effllm_lib import results
from effllm_lib.pq import PQConfig, cnn, pq_convert_, pq_layers, sweeps
from effllm_lib.pq.train import (augment_crop_flip, calibrate_, distill_loss, eligible_layers, finetune_e2e_,
                                 progressive_convert_, recalibrate_bn_, train_float)


class _Tiny(nn.Module):
    """stem (skipped) -> conv+BN -> 1x1 conv+BN -> pooled fc (skipped): two eligible PQ layers."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.body(F.relu(self.stem(x))).mean((2, 3)))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) * 0.5 + y.view(-1, 1, 1, 1).float()  # learnable by class
    return x, y


# ------------------------------------------------------------------------------------------ distillation
def test_distill_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0]])
    teacher = torch.tensor([[0.0, 2.0]])
    labels = torch.tensor([0])
    t, alpha = 2.0, 0.75
    # by hand: student softmax(z/T) = softmax([1, 0]), teacher softmax([0, 1])
    ps = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    pt = ps[::-1]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    ce = -math.log(math.exp(2) / (math.exp(2) + 1))
    want = (1 - alpha) * ce + alpha * t * t * kl
    got = distill_loss(logits, teacher, labels, temperature=t, alpha=alpha)
    assert got.item() == pytest.approx(want, rel=1e-6)
    # a student equal to its teacher pays only the CE part; no teacher = plain CE
    assert distill_loss(teacher, teacher, labels, alpha=alpha).item() == pytest.approx(
        (1 - alpha) * F.cross_entropy(teacher, labels).item(), rel=1e-6)
    assert distill_loss(logits, None, labels).item() == pytest.approx(ce, rel=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distill_loss(logits, teacher, labels, temperature=0)
    with pytest.raises(ValueError, match="alpha"):
        distill_loss(logits, teacher, labels, alpha=1.5)


def test_e2e_finetune_lowers_the_distillation_loss(one_thread):
    torch.manual_seed(0)
    teacher = _Tiny()
    x, y = _data()
    train_float(teacher, (x, y), epochs=20, lr=1e-2, batch_size=32)
    student = pq_convert_(copy.deepcopy(teacher), PQConfig(n_prototypes=4, subvec_len=4, tau=1.0))
    calibrate_(student, x)
    with torch.no_grad():
        t_logits = teacher(x)

    def kd():  # the distillation term alone (alpha = 1)
        with torch.no_grad():
            return distill_loss(student(x), t_logits, y, alpha=1.0).item()

    before = kd()
    stats = finetune_e2e_(student, (x, y), teacher=teacher, epochs=30, lr=3e-3, batch_size=32, kd_alpha=1.0)
    assert stats["steps"] == 90
    assert kd() < 0.5 * before
    for _, layer in pq_layers(student):  # padded prototype coordinates stay at zero
        assert torch.all(layer.prototypes[(layer.proto_mask == 0).expand_as(layer.prototypes)] == 0)
    assert not student.training


def test_e2e_finetune_trains_what_the_flags_say(one_thread):
    torch.manual_seed(1)
    teacher = _Tiny().eval()
    x, y = _data()
    student = pq_convert_(copy.deepcopy(teacher), PQConfig(n_prototypes=4, subvec_len=4))
    calibrate_(student, x)
    stem, bn_w = student.stem.weight.detach().clone(), student.body[1].weight.detach().clone()
    lut = pq_layers(student)[0][1].lut.detach().clone()
    finetune_e2e_(student, (x, y), teacher=teacher, epochs=2, batch_size=32, train_bn=False, train_dense=False,
                  tau=(1.0, 0.05))
    assert torch.equal(student.stem.weight, stem) and torch.equal(student.body[1].weight, bn_w)
    assert not torch.equal(pq_layers(student)[0][1].lut, lut)
    assert all(layer.config.tau == pytest.approx(0.05) for _, layer in pq_layers(student))  # annealed to the end
    finetune_e2e_(student, (x, y), teacher=teacher, epochs=2, batch_size=32)
    assert not torch.equal(student.stem.weight, stem) and not torch.equal(student.body[1].weight, bn_w)
    with pytest.raises(ValueError, match="no PQ layers"):
        finetune_e2e_(_Tiny(), (x, y))
    with pytest.raises(ValueError, match="tau"):
        finetune_e2e_(student, (x, y), tau=(1.0, 0.0))


def test_bn_recalibration_gives_the_batch_statistics(one_thread):
    torch.manual_seed(2)
    net = _Tiny().eval()
    x, _ = _data(64)
    seen = []
    hook = net.body[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    with torch.no_grad():
        net(x)
    hook.remove()
    inputs = seen[0]
    recalibrate_bn_(net, x, batch_size=16)  # 4 equal batches: the cumulative average is the overall mean
    bn = net.body[1]
    torch.testing.assert_close(bn.running_mean, inputs.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    batch_vars = torch.stack([inputs[i:i + 16].var((0, 2, 3), unbiased=True) for i in range(0, 64, 16)])
    torch.testing.assert_close(bn.running_var, batch_vars.mean(0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.1 and not net.training


# ------------------------------------------------------------------------------------------ augmentation
def test_augmentation_keeps_shapes_and_each_image_its_own():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(32, 3, 8, 8)
    out = augment_crop_flip(x, gen, pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    padded = F.pad(x, (2, 2, 2, 2))
    seen = set()
    for i in range(len(x)):  # brute force: output i is some crop (+ flip) of input i, so labels stay aligned
        found = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (0, 1)
                 if torch.equal(out[i], (lambda c: c.flip(2) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert found, f"image {i} is not a crop/flip of its own input"
        seen.add(found[0])
    assert len(seen) > 5  # per-image offsets, not one per batch
    gen = torch.Generator().manual_seed(4)
    same = augment_crop_flip(x, gen, pad=0)
    assert all(torch.equal(s, a) or torch.equal(s, a.flip(2)) for s, a in zip(same, x))
    with pytest.raises(ValueError, match="B, C, H, W"):
        augment_crop_flip(torch.zeros(3, 8, 8), gen)


# --------------------------------------------------------------------------------- progressive conversion
def test_progressive_conversion_converts_every_eligible_layer(one_thread):
    torch.manual_seed(5)
    net = _Tiny().eval()
    x, y = _data()
    teacher = copy.deepcopy(net)
    config = PQConfig(n_prototypes=4, subvec_len=4, tau=1.0)
    want = [n for n, _ in pq_layers(pq_convert_(copy.deepcopy(net), config))]
    assert want == ["body.0", "body.3"] == eligible_layers(net, config)  # stem and fc stay dense
    out = progressive_convert_(net, config, (x, y), teacher=teacher, epochs_per_layer=1, batch_size=32)
    assert out["layers"] == want and out["steps"] == 2 * 3
    assert [n for n, _ in pq_layers(net)] == want
    assert all(bool(layer.calibrated) for _, layer in pq_layers(net))
    assert isinstance(net.stem, nn.Conv2d) and type(net.fc) is nn.Linear
    assert net(x).shape == (len(x), 3)
    with pytest.raises(ValueError, match="already has PQ layers"):
        progressive_convert_(net, config, (x, y))


# ------------------------------------------------------------------------------------------- the sweeps
def _fake_fashion(folder, n_train=160, n_test=64):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        images[:, 2 * labels.astype(int) + 3, :] = 250  # a bright row per class: learnable
        sweeps._write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        sweeps._write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_idx_files_round_trip(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("EFFLLM_FASHION_MNIST_DIR", str(tmp_path))
    x, y = cnn.fashion_mnist("test")
    assert x.shape == (64, 1, 28, 28) and y.dtype == torch.int64
    raw = (x * cnn.FASHION_STD + cnn.FASHION_MEAN) * 255
    assert all(torch.allclose(raw[i, 0, 2 * y[i] + 3], torch.full((28,), 250.0), atol=1e-3) for i in range(64))


def test_run_network_ci_has_e2e_rows(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("EFFLLM_FASHION_MNIST_DIR", str(_fake_fashion(tmp_path)))
    calls = []
    df = sweeps.run_network("kws", "ci", experiments=("e2e",), checkpoint=lambda d: calls.append(len(d)))
    assert list(df.experiment) == ["float", "e2e", "e2e", "e2e"]
    e2e = df[df.experiment == "e2e"]
    assert list(e2e["mode"]) == ["progressive", "e2e", "e2e"]
    assert (e2e.n_prototypes == 16).all() and (e2e.subvec_len == 4).all()
    assert e2e.proto_bits.isna().sum() == 2 and tuple(e2e.iloc[-1][["proto_bits", "lut_bits"]]) == (2, 6)
    assert e2e.accuracy.between(0, 100).all() and calls == [1, 4]
    assert df.val_accuracy.between(0, 100).all() and (df.seed == 0).all()
    with pytest.raises(ValueError, match="include 'modes'"):
        sweeps.run_network("kws", "ci", experiments=("bits",))
    with pytest.raises(ValueError, match="val_fraction"):
        sweeps.Scale(n_train=10, n_test=10, float_epochs=1, finetune_epochs=1, val_fraction=1.5)
    with pytest.raises(ValueError, match="unknown experiments"):
        sweeps.run_network("kws", "ci", experiments=("e3e",))


def test_claims_prefer_the_e2e_recipe():
    base = {"network": "resnet20", "n_prototypes": 16, "subvec_len": 9, "float_accuracy": 80.0,
            "layer_mse": None, "proto_bits": None, "lut_bits": None}
    rows = [{**base, "experiment": "modes", "mode": "both", "accuracy": 60.0},
            {**base, "experiment": "lowbit", "mode": "best float tables", "accuracy": 60.0},
            {**base, "experiment": "e2e", "mode": "progressive", "accuracy": 70.0},
            {**base, "experiment": "e2e", "mode": "e2e", "accuracy": 77.5},
            {**base, "experiment": "e2e", "mode": "e2e", "accuracy": 79.0, "proto_bits": 6, "lut_bits": 5}]
    out = sweeps.claims(pd.DataFrame(rows)).set_index("claim_id")
    assert out.loc["accuracy_loss", "ours"] == pytest.approx(2.5)  # the e2e float-table row, not the low-bit one
    assert "e2e recipe" in out.loc["accuracy_loss", "reason"]
    # the low-bit drop compares the e2e pair (77.5 -> 79.0), not the tables-only lowbit rows
    assert out.loc["lowbit_drop_resnet20", "ours"] == pytest.approx(-1.5)
    assert "e2e recipe" in out.loc["lowbit_drop_resnet20", "reason"]
    tables_only = [*rows[:2], {**base, "experiment": "lowbit", "mode": "rounded", "accuracy": 55.0, "proto_bits": 6,
                               "lut_bits": 5}]
    out = sweeps.claims(pd.DataFrame(tables_only)).set_index("claim_id")
    assert out.loc["lowbit_drop_resnet20", "ours"] == pytest.approx(5.0)  # no e2e pair: the lowbit rows
    assert "tables-only" in out.loc["lowbit_drop_resnet20", "reason"]
    old = sweeps.claims(pd.DataFrame(rows[:2])).set_index("claim_id")
    assert old.loc["accuracy_loss", "ours"] == pytest.approx(20.0)


def _run_main(tmp_path, monkeypatch, networks, parallel):
    monkeypatch.delenv("EFFLLM_FASHION_MNIST_DIR", raising=False)  # main sets it: restored after the test
    (tmp_path / "fashion-mnist").mkdir()
    fashion = _fake_fashion(tmp_path / "fashion-mnist")
    out = tmp_path / "out"
    code = sweeps.main(["--scale", "ci", "--device", "cpu", "--networks", *networks, "--experiments", "e2e",
                        "--fashion", str(fashion), "--out", str(out)] + (["--parallel"] if parallel else []))
    assert code == 0
    for name in networks:
        df = results.read(out / f"accuracy_sweep_{name}.csv")
        meta = df.attrs["provenance"]
        assert meta["name"] == f"accuracy_sweep_{name}" and meta["params"]["network"] == name
        assert "partial" not in meta["params"] and meta["params"]["scale_params"]["e2e_epochs"] > 0
        assert set(df.network) == {name} and "e2e" in set(df.experiment)
    assert sorted(p.name for p in out.glob("*.csv")) == sorted(f"accuracy_sweep_{n}.csv" for n in networks)
    return out


def test_main_saves_one_named_file_per_network(tmp_path, monkeypatch, one_thread):
    _run_main(tmp_path, monkeypatch, ["kws"], parallel=False)
    with pytest.raises(SystemExit, match="no train-images"):
        sweeps.main(["--fashion", str(tmp_path), "--networks", "kws", "--out", str(tmp_path / "out")])


@pytest.mark.slow
def test_main_parallel_runs_one_process_per_network(tmp_path, monkeypatch):
    _run_main(tmp_path, monkeypatch, ["kws", "emnist"], parallel=True)  # the GPU command's shape (~1 min)
