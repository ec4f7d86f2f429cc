"""The chapter's accuracy experiments: train a float network, product-quantize it, sweep the PQ knobs.

``run_network(name, scale)`` returns one tidy table (one row per evaluated model) with the columns
``network, seed, experiment, n_prototypes, subvec_len, mode, tau, proto_bits, lut_bits, accuracy, val_accuracy,
float_accuracy, accuracy_loss, layer_mse``. Protocol: a validation split (``Scale.val_fraction`` of the training
images, the same for every seed) is carved off before anything is trained; every choice (the best mode/tau model
the bits and lowbit rows start from, the claims' best row) is made on ``val_accuracy``, and ``accuracy`` is the
held-out set's, read once per row. In every k-means and tables-only row (grid, modes, bits, lowbit) the BatchNorm
statistics are re-estimated on training images (``recalibrate_bn_``) before evaluation. Experiments:

* ``float``:  the trained float network;
* ``grid``:   accuracy and mean layer-output MSE over (N_p, L_s), after k-means and after fine-tuning both tables;
* ``modes``:  the paper's (N_p, L_s), training mode (kmeans / lut / prototypes / both) x temperature tau;
* ``bits``:   the fine-tuned paper setting with its tables rounded to (prototype bits, LUT bits) in 2..8;
* ``lowbit``: the paper's low-bit setting fine-tuned with the low-bit tables in the loop (quantization-aware).
* ``e2e``:    the paper's (N_p, L_s) with the improved recipe (``E2E_RECIPE``; PECAN / LUT-NN style):
  progressive conversion (layer by layer from the input side, each layer k-means-calibrated on the
  activations of the already-PQ prefix, then a short fine-tune of the whole model), then end-to-end
  fine-tuning of the tables, BatchNorm and the dense stem/classifier with knowledge distillation from the
  float model (KL at temperature 4 + CE), per-image crop+flip augmentation on CIFAR, warmup + cosine LR and
  BN statistics re-estimated at the end. Rows (``mode``): ``progressive`` (after conversion), ``e2e`` (after
  the end-to-end fine-tune) and, when ``e2e_lowbit_epochs`` > 0, ``e2e`` with the paper's low-bit tables
  fine-tuned in the loop from the e2e model. The other experiments keep their recipe (tables only, BN frozen
  during fine-tuning, statistics re-estimated after it).

``claims(df)`` turns the tables into scorecard rows, averaged over the seeds present (mean and a 95% t-interval).
Everything is seeded; ``device`` may be "cuda"; ``main --seeds 0 1 2`` runs several seeds.
Scales: ``SCALES`` (KWS), ``EMNIST_SCALE``, ``RESNET_SCALE``; ``scale_for(name, scale)`` picks the entry.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from . import cnn
from .layers import PQConfig, pq_convert_, set_bits_, set_tau_
from .train import (accuracy, augment_crop_flip, calibrate_, finetune_, finetune_e2e_, mean_layer_mse,
                    progressive_convert_, recalibrate_bn_, train_float)

# The paper's PQ settings (N_p, L_s) and low-bit tables (prototype bits, LUT bits) per network.
PAPER_SETTING = {"resnet20": (16, 9), "kws": (16, 4), "emnist": (12, 4)}
PAPER_LOWBIT = {"resnet20": (6, 5), "kws": (2, 6), "emnist": (5, 5)}
MODES = ("kmeans", "lut", "prototypes", "both")
GRID_TAU = 1.0  # the grid fine-tunes at tau 1: tau <= 0.01 gives huge, noisy prototype gradients (see modes)
TAUS = (0.001, 0.01, 0.1, 1.0)
EXPERIMENTS = ("float", "e2e", "grid", "modes", "bits", "lowbit")
# The e2e recipe; see finetune_e2e_ for each knob. Chosen by a CPU ablation (ResNet-20 on 16x16 CIFAR,
# N_p 16, L_s 9, float 66.5%; equal step budgets): progressive conversion was the largest gain (55.6% vs
# 51.4% all-at-once, 52.2% tables-only), then BN training (+7 points) and distillation at T 4 (+3);
# annealing tau 1 -> 0.05 lost 6 points, so tau stays 1 (straight-through forward, soft gradient).
# Augmentation was neutral in one-epoch runs; it is kept for the long runs on 8k CIFAR images.
# The e2e low-bit row fine-tunes from the e2e model at lr / 3.
E2E_RECIPE = {"tau": 1.0, "lr": 1e-3, "kd_temperature": 4.0, "kd_alpha": 0.9, "warmup": 0.05,
              "train_bn": True, "train_dense": True}
AUGMENT = ("none", "per_batch", "per_image")  # CIFAR float-training augmentation: cnn.flip_crop / augment_crop_flip


@dataclass
class Scale:
    n_train: int | None          # training images (None = all)
    n_test: int                  # held-out images used for every accuracy
    float_epochs: float
    finetune_epochs: float
    grid_np: tuple = (4, 8, 16, 32, 64)
    grid_ls: tuple = (2, 4, 8, 16)
    taus: tuple = TAUS
    modes: tuple = MODES
    bits: tuple = (2, 3, 4, 5, 6, 8)
    n_calib: int = 2048
    grid_finetune_epochs: float | None = None  # None = finetune_epochs
    extra: dict = field(default_factory=dict)
    batch_size: int = 128                      # float training and every fine-tune
    augment: str = "per_batch"                 # ResNet-20 (CIFAR) augmentation, one of AUGMENT
    e2e_layer_epochs: float = 0.0              # e2e: fine-tuning after each layer's conversion
    e2e_epochs: float = 0.0                    # e2e: end-to-end fine-tuning; 0 = no e2e experiment
    e2e_lowbit_epochs: float = 0.0             # e2e: low-bit (PAPER_LOWBIT) fine-tuning from the e2e model
    val_fraction: float = 0.1                  # training images held out for every choice (validation)

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.augment not in AUGMENT:
            raise ValueError(f"augment must be one of {AUGMENT}, got {self.augment!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


SCALES = {
    # CI: the KWS shape on a slice of Fashion-MNIST, a small grid: about a minute on 2 CPU cores
    "ci": Scale(n_train=2000, n_test=500, float_epochs=2, finetune_epochs=0.25, grid_np=(4, 16), grid_ls=(4,),
                taus=(0.01,), modes=("kmeans", "both"), bits=(2, 4, 8), n_calib=256, grid_finetune_epochs=0,
                e2e_layer_epochs=0.05, e2e_epochs=0.25, e2e_lowbit_epochs=0.1),
    # cpu: a reduced full run that fits a few CPU-hours-free minutes (used when no GPU is available)
    "cpu": Scale(n_train=20000, n_test=5000, float_epochs=4, finetune_epochs=0.3, grid_np=(4, 8, 16, 32),
                 grid_ls=(2, 4, 8), taus=(0.01, 0.1, 1.0), bits=(2, 3, 4, 5, 6, 8), n_calib=1024,
                 grid_finetune_epochs=0),
    # full: what the book shows (run on a GPU: see the chapter's notes)
    "full": Scale(n_train=None, n_test=10000, float_epochs=15, finetune_epochs=1, grid_finetune_epochs=0.5,
                  e2e_layer_epochs=0.2, e2e_epochs=4, e2e_lowbit_epochs=1),
}
# EMNIST shape (first full run: sized to share one 8-minute H100 call with ResNet-20). Batch 256: these
# 1x1 nets are launch-bound on a GPU, so a larger batch halves the time per epoch.
EMNIST_SCALE = {
    "ci": SCALES["ci"],
    "cpu": SCALES["cpu"],
    "full": Scale(n_train=None, n_test=10000, float_epochs=15, finetune_epochs=1, grid_finetune_epochs=0.25,
                  batch_size=256, e2e_layer_epochs=0.2, e2e_epochs=4, e2e_lowbit_epochs=1),
}
RESNET_SCALE = {
    # (CPU: the PQ prefix of a 32x32 ResNet is slow there, so e2e skips the per-layer fine-tunes at ci)
    "ci": Scale(n_train=1000, n_test=500, float_epochs=1, finetune_epochs=0.25, grid_np=(16,), grid_ls=(9,),
                taus=(0.01,), modes=("kmeans",), bits=(6,), n_calib=256, augment="per_image",
                e2e_layer_epochs=0, e2e_epochs=0.1),
    # sized to share one 8-minute H100 call with the EMNIST sweep; most of the time goes to the e2e recipe.
    # (The first committed run, 2026-11-24, used per-batch augmentation, finetune_epochs=8,
    # grid_finetune_epochs=2 and no e2e: float 78.65%, modes/both 58.75%.)
    "full": Scale(n_train=None, n_test=2000, float_epochs=60, finetune_epochs=3, grid_np=(16, 64),
                  grid_ls=(3, 9), taus=(1.0,), modes=("kmeans", "lut", "both"), bits=(2, 4, 5, 6, 8),
                  n_calib=1024, grid_finetune_epochs=0.5, augment="per_image", e2e_layer_epochs=0.5,
                  e2e_epochs=10, e2e_lowbit_epochs=1),
}


def scale_for(name: str, scale: str | Scale) -> Scale:
    """The ``Scale`` of network ``name`` at ``scale`` ("ci", "cpu", "full"), or ``scale`` itself."""
    if isinstance(scale, Scale):
        return scale
    table = {"resnet20": RESNET_SCALE, "emnist": EMNIST_SCALE}.get(name, SCALES)
    if scale not in table:
        raise ValueError(f"scale must be one of {sorted(table)} for {name}, got {scale!r}")
    return table[scale]


def load_data(name: str, scale: Scale, cifar_images=None, cifar_labels=None):
    """((train x, y), (test x, y)) for a network: Fashion-MNIST for KWS/EMNIST, a CIFAR-10 split for ResNet-20.

    ResNet-20: only the 10,000-image CIFAR-10 test set exists offline, so it is split (seeded) into
    ``n_test`` held-out images and the rest for training; pass its uint8 images and labels.
    """
    if name == "resnet20":
        if cifar_images is None:
            raise ValueError("resnet20 needs cifar_images / cifar_labels (the offline CIFAR-10 test set)")
        x, y = cnn.normalize_cifar(cifar_images), torch.as_tensor(np.asarray(cifar_labels)).long()
        train, test = cnn.split_train_test(x, y, scale.n_test)
        if scale.n_train:
            train = (train[0][:scale.n_train], train[1][:scale.n_train])
        return train, test
    if name not in cnn.MODELS:
        raise ValueError(f"unknown network {name!r}; expected one of {', '.join(cnn.MODELS)}")
    return cnn.fashion_mnist("train", scale.n_train), cnn.fashion_mnist("test", scale.n_test)


def _to(data, device):
    return tuple(t.to(device) for t in data)


def _row(name, experiment, accs, float_acc, n_p=None, l_s=None, mode=None, tau=None, pbits=None,
         lbits=None, mse=None, seconds=None, seed=0, mse_float=None):
    """One result row; ``accs`` = (validation accuracy, held-out accuracy). ``mse``: mean layer-output MSE on the
    inputs of the PQ model (prefix quantized); ``mse_float``: the same on the float network's inputs."""
    val_acc, model_acc = accs
    return {"network": name, "seed": seed, "experiment": experiment, "n_prototypes": n_p, "subvec_len": l_s,
            "mode": mode, "tau": tau, "proto_bits": pbits, "lut_bits": lbits, "accuracy": model_acc,
            "val_accuracy": val_acc, "float_accuracy": float_acc, "accuracy_loss": float_acc - model_acc,
            "layer_mse": mse, "layer_mse_float": mse_float, "seconds": seconds}


def split_validation(train, fraction: float):
    """(train, validation): ``fraction`` of the training images carved off with a fixed seed (the same split for
    every training seed, so seeds vary the training, not the data)."""
    n_val = max(1, round(fraction * len(train[0])))
    return cnn.split_train_test(train[0], train[1], n_val, seed=0)


def pq_model(float_model, n_p, l_s, calib, *, tau=0.01, bits=(None, None), seed=0):
    model = copy.deepcopy(float_model)
    pq_convert_(model, PQConfig(n_prototypes=n_p, subvec_len=l_s, tau=tau, proto_bits=bits[0],
                                lut_bits=bits[1]))
    calibrate_(model, calib, seed=seed)
    return model


def _augment(name: str, scale: Scale):
    if name != "resnet20" or scale.augment == "none":
        return None
    return cnn.flip_crop if scale.augment == "per_batch" else augment_crop_flip


def run_network(name: str, scale: str | Scale = "ci", *, device: str = "cpu", seed: int = 0,
                cifar_images=None, cifar_labels=None, verbose: bool = False, experiments=None,
                checkpoint=None) -> pd.DataFrame:
    """Every experiment of the module docstring for one network; returns the tidy results table.

    ``experiments``: a subset of ``EXPERIMENTS`` (default: all; ``float`` always runs; ``bits`` and
    ``lowbit`` need ``modes``). ``checkpoint(df)``, if given, is called with the rows so far after each
    experiment (e.g. to save partial results on a machine that may be stopped).
    """
    scale = scale_for(name, scale)
    experiments = set(EXPERIMENTS if experiments is None else experiments) | {"float"}
    unknown = experiments - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiments {sorted(unknown)}; expected some of {EXPERIMENTS}")
    if experiments & {"bits", "lowbit"} and "modes" not in experiments:
        raise ValueError("experiments 'bits' and 'lowbit' start from the best 'modes' model: include 'modes'")
    torch.manual_seed(seed)
    train, test = load_data(name, scale, cifar_images, cifar_labels)
    train, val = split_validation(train, scale.val_fraction)
    train, val, test = _to(train, device), _to(val, device), _to(test, device)
    calib = train[0][:scale.n_calib]
    bn_images = train[0][:4096]

    def evaluate(model, recalibrate=True):
        """(validation, held-out) accuracy; k-means / tables-only models get their BN statistics re-estimated."""
        if recalibrate:
            recalibrate_bn_(model, bn_images)
        return accuracy(model, val), accuracy(model, test)
    log = print if verbose else (lambda *a, **k: None)
    t0 = time.time()
    rows = []

    def done():
        if checkpoint is not None:
            checkpoint(pd.DataFrame(rows))

    float_model = cnn.MODELS[name]().to(device)
    augment = _augment(name, scale)
    bs = scale.batch_size
    train_float(float_model, train, epochs=scale.float_epochs, seed=seed, augment=augment, batch_size=bs)
    float_accs = evaluate(float_model, recalibrate=False)
    float_acc = float_accs[1]
    rows.append(_row(name, "float", float_accs, float_acc, seconds=time.time() - t0, seed=seed))
    log(f"{name}: float {float_acc:.2f}% ({time.time() - t0:.0f}s)")
    done()
    ft = dict(epochs=scale.finetune_epochs, seed=seed, teacher=float_model, batch_size=bs)
    n_p, l_s = PAPER_SETTING[name]

    # the improved recipe at the paper's setting: progressive conversion, then end-to-end fine-tuning
    if "e2e" in experiments and scale.e2e_epochs > 0:
        t = time.time()
        recipe = {k: v for k, v in E2E_RECIPE.items() if k != "tau"}
        e2e_kw = dict(batch_size=bs, augment=augment, **recipe)
        model = copy.deepcopy(float_model)
        progressive_convert_(model, PQConfig(n_prototypes=n_p, subvec_len=l_s, tau=E2E_RECIPE["tau"]), train,
                             teacher=float_model, calib_images=calib, epochs_per_layer=scale.e2e_layer_epochs,
                             seed=seed, **e2e_kw)
        rows.append(_row(name, "e2e", evaluate(model, recalibrate=False), float_acc, n_p, l_s, "progressive",
                         E2E_RECIPE["tau"], seconds=time.time() - t, seed=seed))
        t = time.time()
        finetune_e2e_(model, train, teacher=float_model, epochs=scale.e2e_epochs, seed=seed, **e2e_kw)
        rows.append(_row(name, "e2e", evaluate(model, recalibrate=False), float_acc, n_p, l_s, "e2e",
                         E2E_RECIPE["tau"], seconds=time.time() - t, seed=seed))
        log(f"  e2e: progressive {rows[-2]['accuracy']:.2f}, end-to-end {rows[-1]['accuracy']:.2f} "
            f"({rows[-2]['seconds'] + rows[-1]['seconds']:.0f}s)")
        if scale.e2e_lowbit_epochs > 0:
            t = time.time()
            pbits, lbits = PAPER_LOWBIT[name]
            model = set_bits_(model, pbits, lbits)
            t = time.time()  # the low-bit row's own fine-tune, not the e2e run before it
            finetune_e2e_(model, train, teacher=float_model, epochs=scale.e2e_lowbit_epochs, seed=seed,
                          **{**e2e_kw, "lr": E2E_RECIPE["lr"] / 3})
            rows.append(_row(name, "e2e", evaluate(model, recalibrate=False), float_acc, n_p, l_s, "e2e",
                             E2E_RECIPE["tau"], pbits, lbits, seconds=time.time() - t, seed=seed))
            log(f"  e2e low-bit {pbits}/{lbits}: {rows[-1]['accuracy']:.2f}")
        del model
        done()

    # (N_p, L_s) grid: k-means only, then fine-tune both tables
    if "grid" in experiments:
        for g_np in scale.grid_np:
            for g_ls in scale.grid_ls:
                t = time.time()
                model = pq_model(float_model, g_np, g_ls, calib, tau=GRID_TAU, seed=seed)
                mse = mean_layer_mse(model, calib[:256])
                mse_float = mean_layer_mse(model, calib[:256], inputs="float")
                rows.append(_row(name, "grid", evaluate(model), float_acc, g_np, g_ls, "kmeans", None,
                                 mse=mse, seconds=time.time() - t, seed=seed, mse_float=mse_float))
                grid_epochs = (scale.grid_finetune_epochs if scale.grid_finetune_epochs is not None
                               else scale.finetune_epochs)
                if not grid_epochs:
                    continue
                finetune_(model, train, mode="both", **{**ft, "epochs": grid_epochs})
                rows.append(_row(name, "grid", evaluate(model), float_acc, g_np, g_ls, "both", GRID_TAU,
                                 seconds=time.time() - t, seed=seed))
                log(f"  grid N_p={g_np} L_s={g_ls}: kmeans {rows[-2]['accuracy']:.2f} "
                    f"both {rows[-1]['accuracy']:.2f}")
        done()

    if "modes" not in experiments:
        log(f"{name}: total {time.time() - t0:.0f}s")
        return pd.DataFrame(rows)
    # training mode x tau at the paper's setting
    base = pq_model(float_model, n_p, l_s, calib, seed=seed)
    best_model, best_accs, best_model_tau = base, evaluate(base), None  # chosen on validation accuracy
    for mode in scale.modes:
        for tau in (scale.taus if mode != "kmeans" else (None,)):
            t = time.time()
            model = copy.deepcopy(base)
            if mode != "kmeans":
                set_tau_(model, tau)
                finetune_(model, train, mode=mode, **ft)
            accs = evaluate(model)
            rows.append(_row(name, "modes", accs, float_acc, n_p, l_s, mode, tau, seconds=time.time() - t,
                             seed=seed))
            if accs[0] > best_accs[0]:
                best_model, best_accs, best_model_tau = model, accs, tau
            log(f"  mode {mode} tau {tau}: val {accs[0]:.2f} held-out {accs[1]:.2f}")
    done()

    # post-training rounding of the best fine-tuned tables to (prototype, LUT) bits
    if "bits" in experiments:
        for pbits in scale.bits:
            for lbits in scale.bits:
                model = set_bits_(copy.deepcopy(best_model), pbits, lbits)
                rows.append(_row(name, "bits", evaluate(model), float_acc, n_p, l_s, "rounded", None,
                                 pbits, lbits, seed=seed))
        done()
    # the paper's low-bit setting, fine-tuned with the low-bit tables in the loop
    if "lowbit" in experiments:
        pbits, lbits = PAPER_LOWBIT[name]
        model = set_bits_(copy.deepcopy(best_model), pbits, lbits)
        t = time.time()
        finetune_(model, train, mode="both", **ft)
        rows.append(_row(name, "lowbit", evaluate(model), float_acc, n_p, l_s, "both",
                         best_model_tau, pbits, lbits, seconds=time.time() - t, seed=seed))
        rows.append(_row(name, "lowbit", best_accs, float_acc, n_p, l_s, "best float tables", None, seed=seed))
        log(f"  lowbit {pbits}/{lbits}: {rows[-2]['accuracy']:.2f} (float tables {best_accs[1]:.2f})")
    log(f"{name}: total {time.time() - t0:.0f}s")
    return pd.DataFrame(rows)


def load_committed() -> pd.DataFrame:
    """All committed ``accuracy_sweep_<network>`` tables, concatenated (one GPU run per network)."""
    from .. import results

    names = [n for n in results.available("pqa") if n.startswith("accuracy_sweep_")]
    # per-seed files (accuracy_sweep_<net>_seed<k>, one device call each) replace the network's single table
    seeded = {n.rsplit("_seed", 1)[0] for n in names if "_seed" in n}
    names = [n for n in names if "_seed" in n or n not in seeded]
    if not names:
        raise RuntimeError("no committed accuracy_sweep_<network> results in data/results/pqa")
    frames = [results.load("pqa", n) for n in names]
    df = pd.concat(frames, ignore_index=True)
    df.attrs["provenance"] = frames[0].attrs["provenance"]
    df.attrs["sources"] = {n: f.attrs["provenance"] for n, f in zip(names, frames)}
    return df


def sweep_source(df: pd.DataFrame, network: str) -> dict:
    """Provenance of the committed table ``network``'s rows come from (``load_committed``'s ``attrs["sources"]``):
    its single ``accuracy_sweep_<network>`` table, or the lowest seed's ``accuracy_sweep_<network>_seed<k>``
    (every seed file of a network is run with the same scale parameters)."""
    src = df.attrs.get("sources", {})
    names = [n for n in src if n == f"accuracy_sweep_{network}" or n.startswith(f"accuracy_sweep_{network}_seed")]
    if not names:
        raise KeyError(f"no committed accuracy_sweep table for network {network!r} (have: {sorted(src)})")
    return src[min(names, key=lambda n: (n != f"accuracy_sweep_{network}", int(n.rsplit("_seed", 1)[-1])
                                         if "_seed" in n else -1))]


CONFIG_COLUMNS = ["network", "experiment", "n_prototypes", "subvec_len", "mode", "tau", "proto_bits", "lut_bits"]


def seed_mean(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run configuration (``CONFIG_COLUMNS``): numeric results averaged over the seeds that ran it,
    with ``n_seeds``; the first-seen order of configurations and the table's attrs are kept. A table with one
    seed per configuration comes back with the same rows."""
    keys = [c for c in CONFIG_COLUMNS if c in df]
    values = [c for c in df.columns if c not in keys and c != "seed" and pd.api.types.is_numeric_dtype(df[c])]
    # missing keys (NaN tau, bits) must group too: fill with a sentinel, then restore
    filled = df[keys].astype(object).where(df[keys].notna(), "__none__")
    grouped = df[values].groupby([filled[c] for c in keys], sort=False)
    out = grouped.mean().reset_index()
    out["n_seeds"] = grouped.size().to_numpy()
    out[keys] = out[keys].where(out[keys] != "__none__", np.nan)
    for c in keys:  # back to the source dtypes where they were numeric
        if pd.api.types.is_numeric_dtype(df[c]):
            out[c] = pd.to_numeric(out[c])
    out.attrs = dict(df.attrs)
    return out


T_975 = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365, 9: 2.306, 10: 2.262}


def mean_interval(values) -> tuple[float, float | None]:
    """(mean, half-width of the 95% t-interval) of per-seed values; None for a single seed."""
    v = np.asarray(list(values), dtype=float)
    if len(v) < 2:
        return float(v.mean()), None
    return float(v.mean()), float(T_975.get(len(v), 1.96) * v.std(ddof=1) / np.sqrt(len(v)))


def _seeds(df: pd.DataFrame):
    """(seed, rows) per seed; tables from before the seed column count as seed 0."""
    df = df if "seed" in df else df.assign(seed=0)
    return list(df.groupby(df["seed"].fillna(0)))


def _claim(claim_id, per_seed: dict, reason: str) -> dict:
    mean, half = mean_interval(per_seed.values())
    spread = (f"mean of {len(per_seed)} seeds, 95% interval +-{half:.2f}" if half is not None
              else "one seed, no interval")
    return {"claim_id": claim_id, "ours": mean, "status": "measured", "reason": f"{reason}; {spread}",
            "n_seeds": len(per_seed), "ci95_halfwidth": half,
            # the scorecard's interval columns: with one seed there is none, and an accuracy claim stays
            # inconclusive until more seeds are run
            "ours_lo": None if half is None else mean - half, "ours_hi": None if half is None else mean + half}


def _best_by_validation(sub: pd.DataFrame) -> pd.Series:
    """The row a practitioner would pick: highest validation accuracy (held-out accuracy for tables that
    predate the validation split)."""
    key = "val_accuracy" if "val_accuracy" in sub and sub["val_accuracy"].notna().all() else "accuracy"
    return sub.loc[sub[key].idxmax()]


def claims(df: pd.DataFrame) -> pd.DataFrame:
    """Scorecard rows (claim_id, ours, status, reason, n_seeds, ci95_halfwidth) from ``run_network`` tables of
    several networks and seeds: each claim is computed per seed, then averaged."""
    out = []
    nets = set(df.network)
    main = "resnet20" if "resnet20" in nets else ("emnist" if "emnist" in nets else sorted(nets)[0])
    net = df[df.network == main]
    e2e = net[(net.experiment == "e2e") & (net["mode"] == "e2e") & net["proto_bits"].isna()] \
        if "mode" in net else net.iloc[:0]
    if not e2e.empty:  # the pre-declared recipe's single result per seed (not a maximum picked on the test set)
        per_seed = {seed: float(g.iloc[-1].float_accuracy - g.iloc[-1].accuracy) for seed, g in _seeds(e2e)}
        row = e2e.iloc[-1]
        out.append(_claim("accuracy_loss", per_seed,
                          f"{main}: float minus PQ held-out accuracy at the paper's (N_p, L_s) with float tables, "
                          f"e2e recipe (progressive layer-by-layer conversion, then end-to-end fine-tuning of "
                          f"tables + BN + dense stem/classifier with distillation from the float model, "
                          f"augmentation, cosine LR); last seed {row.float_accuracy:.2f}% -> {row.accuracy:.2f}%"))
    else:
        per_seed = {}
        for seed, g in _seeds(net[net.experiment.isin(["modes", "lowbit"])]):
            best = _best_by_validation(g[g["proto_bits"].isna()])
            per_seed[seed] = float(best.float_accuracy - best.accuracy)
        out.append(_claim("accuracy_loss", per_seed,
                          f"{main}: float minus PQ held-out accuracy of the float-table model chosen on validation "
                          f"accuracy at the paper's (N_p, L_s) (tables-only fine-tuning, short)"))
    for name in ("resnet20", "kws", "emnist"):
        # Prefer the e2e pair (the e2e network, then the same with rounded tables and one epoch in the loop):
        # the tables-only "lowbit" pair trains the low-bit model for more epochs than its float reference,
        # so there the low-bit model can come out ahead for reasons that have nothing to do with bit width.
        for exp, recipe in (("e2e", "e2e recipe"), ("lowbit", "tables-only fine-tuning")):
            low = df[(df.network == name) & (df.experiment == exp)]
            if exp == "e2e" and "mode" in low:
                low = low[low["mode"] == "e2e"]
            if low.proto_bits.notna().sum() and low.proto_bits.isna().sum():
                break
        else:
            continue  # not run: the scorecard then says "not yet measured"
        per_seed = {}
        for seed, g in _seeds(low):
            q, f = g[g.proto_bits.notna()], g[g.proto_bits.isna()]
            if len(q) and len(f):
                per_seed[seed] = float(f.iloc[0].accuracy - q.iloc[0].accuracy)
        q = low[low.proto_bits.notna()].iloc[0]
        out.append(_claim(f"lowbit_drop_{name}", per_seed,
                          f"{int(q.proto_bits)}-bit prototypes / {int(q.lut_bits)}-bit LUT, {recipe}, rounded tables "
                          f"fine-tuned in the loop, float-table minus low-bit held-out accuracy"))
    rhos, inputs = mse_trends(df)
    for claim, col in (("error_falls_with_np", "n_prototypes"), ("error_rises_with_ls", "subvec_len")):
        each = ", ".join(f"{n} {r:+.2f}" for n, r in rhos[col].items())
        out.append({"claim_id": claim, "ours": float(np.nanmean(list(rhos[col].values()))) if rhos[col] else None,
                    "status": "measured",
                    "reason": f"mean Spearman rho over {len(rhos[col])} network(s) ({each}), k-means tables; each "
                              f"layer's absolute output MSE on {inputs}"})
    return pd.DataFrame(out)


def mse_trends(df: pd.DataFrame) -> tuple[dict, str]:
    """Spearman rho of each PQ layer's output MSE against N_p and against L_s, per network, over the k-means grid
    rows (all seeds pooled): ({"n_prototypes": {network: rho}, "subvec_len": {...}}, what the layers' inputs
    were). Each layer's own error (its inputs from the float network, what the paper plots) where the tables have
    it, else the error on the already-quantized prefix's activations."""
    grid = df[(df.experiment == "grid") & (df["mode"] == "kmeans") & df.layer_mse.notna()]
    mse_col = "layer_mse_float" if "layer_mse_float" in grid and grid.layer_mse_float.notna().all() else "layer_mse"
    inputs = ("the float network's activations" if mse_col == "layer_mse_float"
              else "the activations of the already-quantized prefix")
    rhos = {col: {n: float(g[col].rank().corr(g[mse_col].rank())) for n, g in grid.groupby("network")
                  if g[col].nunique() > 1} for col in ("n_prototypes", "subvec_len")}
    return rhos, inputs


CARRY_FILES = {"cifar": "cifar10_test.npz", "fashion": "fashion-mnist"}


def export_carry(dest) -> dict:
    """Write the data the sweeps need into ``dest`` (e.g. ``.devcache/pqa``) for a machine without our
    assets: the CIFAR-10 test set as an npz (images, labels) and the Fashion-MNIST idx files. Adds a
    ``.gitignore`` so the folder stays out of git. Returns {kind: path}; about 57 MiB in all."""
    from pathlib import Path

    from .. import assets

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / ".gitignore").write_text("*\n")
    images, labels = assets.cifar10_test("full")
    cifar = dest / CARRY_FILES["cifar"]
    tmp = cifar.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, images=images, labels=labels)
    os.replace(tmp, cifar)
    fashion = dest / CARRY_FILES["fashion"]
    fashion.mkdir(exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = assets.fashion_mnist(split)  # installs the Debian package into the cache if needed
        _write_idx(fashion / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(fashion / f"{prefix}-labels-idx1-ubyte.gz", np.asarray(labels, dtype=np.uint8))
    return {"cifar": str(cifar), "fashion": str(fashion)}


def _write_idx(path, array: np.ndarray) -> None:
    """An idx file (the MNIST format ``cnn._read_idx`` reads): uint8 data, big-endian dims, gzip."""
    import gzip

    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    tmp = f"{path}.tmp"
    with gzip.open(tmp, "wb", compresslevel=6) as fh:
        fh.write(header + array.tobytes())
    os.replace(tmp, path)


def _run_parallel(argv: list[str], networks: list[str]) -> int:
    """Run one child process per network (same arguments, one network each), prefixing their output.

    On a GPU these sweeps are mostly bound by kernel-launch overhead, so two networks in two processes
    take little more wall time than the longer one alone."""
    import subprocess
    import threading

    threads = max(1, (os.cpu_count() or 2) // len(networks))
    procs, pumps = [], []
    for name in networks:
        args = [sys.executable, "-m", "effllm_lib.pq.sweeps", *argv, "--networks", name]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)

        def pump(p=proc, tag=name):
            for line in p.stdout:
                print(f"[{tag}] {line}", end="", flush=True)

        th = threading.Thread(target=pump, daemon=True)
        th.start()
        procs.append(proc)
        pumps.append(th)
    codes = [p.wait() for p in procs]
    for th in pumps:
        th.join()
    for name, code in zip(networks, codes):
        print(f"{name}: exit code {code}")
    return 0 if all(code == 0 for code in codes) else 1


def main(argv=None) -> int:
    """``python -m effllm_lib.pq.sweeps --scale full --device cuda --networks kws emnist resnet20``

    Saves one ``accuracy_sweep_<network>`` table per network (with provenance, after each experiment while
    it runs, ``"partial": true`` in the params until the network is done), then recomputes
    ``accuracy_claims`` from every committed sweep. ``--out DIR`` writes the sweep tables there instead
    (e.g. on a remote GPU machine; copy them into data/results/pqa and run ``--claims-only`` here).
    ``--parallel`` runs the networks in separate processes at once. On a machine without our assets:
    ``--export-carry .devcache/pqa`` here, then ``--cifar .devcache/pqa/cifar10_test.npz
    --fashion .devcache/pqa/fashion-mnist`` there.
    """
    import argparse
    from pathlib import Path

    from .. import results

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--scale", default="ci", choices=sorted(SCALES))
    ap.add_argument("--label", default=None, choices=["ci", "full"],
                    help="results scale label (default: ci for ci, full otherwise)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--networks", nargs="+", default=["kws", "emnist", "resnet20"], choices=sorted(cnn.MODELS))
    ap.add_argument("--experiments", nargs="+", default=None, choices=EXPERIMENTS,
                    help="subset of the experiments (default: all)")
    ap.add_argument("--cifar", help="npz with images/labels of the CIFAR-10 test set (default: the asset)")
    ap.add_argument("--fashion", help="folder with the Fashion-MNIST idx .gz files (default: the asset)")
    ap.add_argument("--out", help="folder for the sweep tables (default: data/results/pqa)")
    ap.add_argument("--parallel", action="store_true", help="one process per network, all at once")
    ap.add_argument("--per-seed-files", action="store_true",
                    help="one table per seed, accuracy_sweep_<network>_seed<k> (a seed per 10-minute call); "
                         "load_committed then uses these instead of accuracy_sweep_<network>")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0],
                    help="training seeds, run one after another into one table per network (claims: mean and "
                         "95%% interval over them)")
    ap.add_argument("--claims-only", action="store_true", help="only recompute accuracy_claims")
    ap.add_argument("--no-claims", action="store_true", help=argparse.SUPPRESS)  # set for --parallel children
    ap.add_argument("--export-carry", metavar="DIR",
                    help="write the CIFAR-10 npz and Fashion-MNIST idx files into DIR and exit")
    args = ap.parse_args(argv)
    if args.export_carry:
        for kind, path in export_carry(args.export_carry).items():
            print(f"{kind}: {path}")
        return 0
    label = args.label or ("ci" if args.scale == "ci" else "full")
    if args.fashion:
        folder = Path(args.fashion)
        if not (folder / "train-images-idx3-ubyte.gz").is_file():
            raise SystemExit(f"--fashion {folder}: no train-images-idx3-ubyte.gz there "
                             "(make it with --export-carry)")
        os.environ["EFFLLM_FASHION_MNIST_DIR"] = str(folder.resolve())
    if args.parallel and not args.claims_only and len(args.networks) > 1:
        child = ["--scale", args.scale, "--device", args.device, "--no-claims", "--seeds", *map(str, args.seeds)]
        if args.per_seed_files:
            child.append("--per-seed-files")
        for flag, value in (("--label", args.label), ("--cifar", args.cifar), ("--fashion", args.fashion),
                            ("--out", args.out)):
            if value:
                child += [flag, str(value)]
        if args.experiments:
            child += ["--experiments", *args.experiments]
        code = _run_parallel(child, args.networks)
        if code:
            return code
        args.claims_only = True  # the children saved the sweeps; the claims below, once
    if not args.claims_only:
        cifar = (None, None)
        if "resnet20" in args.networks:
            if args.cifar:
                with np.load(args.cifar) as z:
                    cifar = (z["images"], z["labels"])
            else:
                from .. import assets

                cifar = assets.cifar10_test("ci" if args.scale == "ci" else "full")
        for name in args.networks:
            scale = scale_for(name, args.scale)
            params = {"network": name, "scale": args.scale, "device": args.device,
                      "setting": PAPER_SETTING[name], "lowbit": PAPER_LOWBIT[name],
                      "scale_params": asdict(scale), "e2e_recipe": E2E_RECIPE,
                      "experiments": sorted(args.experiments or EXPERIMENTS), "seeds": args.seeds}
            groups = [[seed] for seed in args.seeds] if args.per_seed_files else [args.seeds]
            for seeds in groups:
                table = f"accuracy_sweep_{name}" + (f"_seed{seeds[0]}" if args.per_seed_files else "")
                path = Path(args.out) / f"{table}.csv" if args.out else None
                done = []  # the finished seeds' tables

                def checkpoint(df, table=table, params=params, path=path, done=done):
                    results.save(pd.concat([*done, df], ignore_index=True), "pqa", table,
                                 params={**params, "partial": True}, scale=label, path=path)

                for seed in seeds:
                    done.append(run_network(name, scale, device=args.device, seed=seed, cifar_images=cifar[0],
                                            cifar_labels=cifar[1], verbose=True, experiments=args.experiments,
                                            checkpoint=checkpoint))
                results.save(pd.concat(done, ignore_index=True), "pqa", table, params={**params, "seeds": seeds},
                             scale=label, path=path)
    if args.out is None and label == "full" and not args.no_claims:
        df = load_committed()
        src = {n: {k: p.get(k) for k in ("date", "commit", "hardware", "scale")}
               for n, p in df.attrs["sources"].items()}
        results.save(claims(df), "pqa", "accuracy_claims", params={"computed_from": sorted(src)}, scale="full",
                     extra={"note": "claims computed from the committed sweeps", "sources": src})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
