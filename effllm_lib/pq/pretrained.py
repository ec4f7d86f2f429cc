"""The packaged pretrained CIFAR-10 CNN, product-quantized and evaluated on images its PQ never saw.

    df = pretrained_pq("full")          # or: python -m effllm_lib.pq.pretrained --scale full [--out DIR]

The network is the Keras CNN of ``keras_cnn`` (80.14% on the full CIFAR-10 test set as a float model). Only
the 10,000-image CIFAR-10 test set exists offline, so it is split with a fixed seed into two disjoint halves:
the *calibration* half (k-means prototypes, table fine-tuning, the e2e recipe and its BN re-estimation all
see only these images) and the *held-out* half (every PQ accuracy is measured there). At "ci" scale the same
split is made of the committed 300-image slice.

PQ setting: the paper's ResNet-20 setting, N_p = 16 prototypes per subspace and sub-vectors of L_s = 9 (one
3x3 window of one input channel in the channel-major im2col row). PQ layers: as in the paper's ResNet-20
(every 3x3 conv except the 3-channel stem; the FC layer stays dense), all 3x3 convs except the first
(``conv2d``, raw RGB input) -- ``conv2d_1`` .. ``conv2d_5`` -- and none of the dense layers
(``dense``, ``dense_1``, ``dense_2``).

Rows (``stage``):

* ``float``:     the float network (on the held-out half, the calibration half and all images);
* ``kmeans``:    PQ with k-means prototypes (``calibrate_``: layer by layer on the activations the already-PQ
  prefix produces), LUT = P . W, no training;
* ``kmeans_bn``: ``kmeans`` + BatchNorm running statistics re-estimated on the calibration half
  (``recalibrate_bn_``; no gradient step);
* ``tables``:    ``kmeans`` + ``finetune_(mode="both")``: LUT and prototypes trained, everything else frozen
  (BN statistics included), CE + KL to the float network, tau 1 (straight-through forward);
* ``e2e``:       ``kmeans`` + the chapter's e2e recipe (``sweeps.E2E_RECIPE``): ``finetune_e2e_`` of the tables,
  BN and the dense layers with distillation from the float network, per-image crop+flip augmentation,
  warmup + cosine LR, BN statistics re-estimated on the calibration half. (With ``e2e_layer_epochs`` > 0
  it starts from ``progressive_convert_`` instead.)

PQ rows are measured on the held-out half and, as an overfitting check, on the calibration half.
Accuracies use ``fast.FastPQConv2d`` (the same hard assignment and tables; about 6x faster on a CPU).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .fast import fast_inference_copy
from .keras_cnn import conv_and_dense_names, load_keras_cifar_cnn, to_input
from .layers import PQConfig, pq_convert_, pq_layers
from .sweeps import E2E_RECIPE
from .train import (accuracy, augment_crop_flip, calibrate_, finetune_, finetune_e2e_, mean_layer_mse,
                    progressive_convert_, recalibrate_bn_)

CHAPTER, NAME = "pqa", "pretrained_cnn"
PAPER_RESNET20_SETTING = (16, 9)  # (N_p, L_s) of the paper's ResNet-20


@dataclass
class PretrainedScale:
    images: str              # which CIFAR-10 test slice: "ci" (300 images) or "full" (10,000)
    n_kmeans: int            # calibration-half images whose activations feed k-means
    tables_epochs: float     # tables-only fine-tuning (epochs over the calibration half)
    e2e_epochs: float        # e2e fine-tuning; 0 = no e2e row
    e2e_layer_epochs: float = 0.0  # > 0: progressive conversion with this much fine-tuning per layer
    n_mse: int = 128         # held-out images for the mean layer-output MSE of each PQ stage
    kmeans_rows: int = 8192  # im2col rows per layer clustered by k-means (a random subset)
    n_calib_eval: int = 1000  # calibration-half images re-scored for PQ rows (an overfitting check)
    batch_size: int = 64
    tables_lr: float = 1e-3


# "full" is sized for about 10 minutes on 2 CPU cores (529 s measured on 2 shared cores, 2026-11-24, before
# the kmeans_bn row was added: fine-tuning costs ~50 ms per image there, the 28x28 conv2d_1 dominating, so each
# fine-tune is half an epoch = 39 steps of 64); "ci" for < 30 s on the 300-image slice (25 s measured).
# The measured accuracies are in data/results/pqa/pretrained_cnn.csv.
SCALES = {
    "ci": PretrainedScale(images="ci", n_kmeans=32, tables_epochs=0.25, e2e_epochs=0.25, n_mse=8,
                          kmeans_rows=2048),
    "full": PretrainedScale(images="full", n_kmeans=512, tables_epochs=0.5, e2e_epochs=0.5),
}
def dense_layers(model: torch.nn.Module) -> tuple[str, ...]:
    """Every Linear of the model: with the default roles (first conv, classifier) the stem conv and the whole
    dense head stay dense, only the convs between are PQ layers."""
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def split_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded split of range(n) into (calibration half, held-out half), disjoint, covering all.

    Each half is in random order (not sorted): the CIFAR-10 test file is sorted by class, so a prefix of a
    half (the k-means images, the calibration images re-scored) is then still a class-balanced sample."""
    if not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"need at least 2 images to split, got {n!r}")
    perm = torch.randperm(int(n), generator=torch.Generator().manual_seed(seed)).numpy()
    half = n // 2
    return perm[:half], perm[half:]


def _acc(model, data, batch_size=250) -> float:
    return accuracy(fast_inference_copy(model) if pq_layers(model) else model, data, batch_size=batch_size)


def _load(scale: PretrainedScale, images, labels):
    if images is None:
        from .. import assets
        images, labels = assets.cifar10_test(scale.images)
    x, y = to_input(images), torch.as_tensor(np.asarray(labels)).long()
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    return x, y


def pretrained_pq(scale: str | PretrainedScale = "ci", *, n_prototypes: int = 16, subvec_len: int = 9,
                  device: str = "cpu", seed: int = 0, model_path=None, images=None, labels=None,
                  verbose: bool = False) -> pd.DataFrame:
    """Float / k-means PQ / tables-fine-tuned PQ / e2e PQ accuracy of the packaged CIFAR-10 CNN.

    Returns one row per (stage, eval_set) with columns ``stage, eval_set, n_images, accuracy,
    float_accuracy, accuracy_loss, n_prototypes, subvec_len, pq_layers, layer_mse, train_seconds``.
    ``df.attrs["calib_index"]`` / ``["held_out_index"]`` are the image indices of the two halves.
    ``images`` / ``labels`` (uint8 NHWC, ints) replace the CIFAR-10 slice of ``scale`` (for tests).
    """
    sc = SCALES.get(scale) if isinstance(scale, str) else scale
    if not isinstance(sc, PretrainedScale):
        raise ValueError(f"scale must be one of {sorted(SCALES)} or a PretrainedScale, got {scale!r}")
    # tau 1 (E2E_RECIPE; sweeps.GRID_TAU): the straight-through forward is the hard assignment, tau shapes the
    # gradient only; smaller tau gave huge, noisy prototype gradients in the chapter's sweeps
    cfg = PQConfig(n_prototypes=n_prototypes, subvec_len=subvec_len, tau=E2E_RECIPE["tau"])  # validates N_p, L_s
    recipe = {k: v for k, v in E2E_RECIPE.items() if k != "tau"}  # tau is the PQConfig's, not an anneal
    log = print if verbose else (lambda *a, **k: None)
    torch.manual_seed(seed)
    x, y = _load(sc, images, labels)
    calib_idx, held_idx = split_indices(len(x), seed)
    calib = (x[calib_idx].to(device), y[calib_idx].to(device))
    held = (x[held_idx].to(device), y[held_idx].to(device))
    everything = (x.to(device), y.to(device))
    kmeans_images = calib[0][:sc.n_kmeans]
    mse_images = held[0][:min(sc.n_mse, len(held[0]))]

    teacher = load_keras_cifar_cnn(model_path).to(device).eval()
    convs, dense = conv_and_dense_names(teacher)
    float_acc = {"held_out": _acc(teacher, held), "calibration": _acc(teacher, calib), "all": _acc(teacher, everything)}
    calib_eval = (calib[0][:sc.n_calib_eval], calib[1][:sc.n_calib_eval])
    float_calib_eval = _acc(teacher, calib_eval)
    rows = []

    def add(stage, model, seconds, mse=None):
        n_pq = len(pq_layers(model))
        sets = {"held_out": held, "calibration": calib_eval} if n_pq else {
            "held_out": held, "calibration": calib, "all": everything}
        for eval_set, data in sets.items():
            acc = float_acc[eval_set] if not n_pq else _acc(model, data)
            ref = float_acc[eval_set] if (eval_set != "calibration" or not n_pq) else float_calib_eval
            rows.append({"stage": stage, "eval_set": eval_set, "n_images": len(data[0]), "accuracy": acc,
                         "float_accuracy": ref, "accuracy_loss": ref - acc,
                         "n_prototypes": n_prototypes if n_pq else None, "subvec_len": subvec_len if n_pq else None,
                         "pq_layers": n_pq, "layer_mse": mse, "train_seconds": seconds})
        log(f"{stage}: " + ", ".join(f"{r['eval_set']} {r['accuracy']:.2f}%" for r in rows[-len(sets):]))

    add("float", teacher, 0.0)

    # k-means only
    t0 = time.time()
    kmeans = copy.deepcopy(teacher)
    pq_convert_(kmeans, cfg, skip=dense_layers(kmeans))
    calibrate_(kmeans, kmeans_images, max_rows=sc.kmeans_rows, seed=seed)
    km_seconds = time.time() - t0
    add("kmeans", kmeans, km_seconds, mean_layer_mse(kmeans, mse_images))

    # k-means + BatchNorm statistics re-estimated on the calibration half (no gradient steps)
    t0 = time.time()
    kmeans_bn = recalibrate_bn_(copy.deepcopy(kmeans), calib[0])
    add("kmeans_bn", kmeans_bn, km_seconds + time.time() - t0)
    del kmeans_bn

    # tables only (LUT + prototypes), everything else frozen
    if sc.tables_epochs > 0:
        tables = copy.deepcopy(kmeans)
        info = finetune_(tables, calib, mode="both", epochs=sc.tables_epochs, lr=sc.tables_lr,
                         batch_size=sc.batch_size, seed=seed, teacher=teacher)
        add("tables", tables, km_seconds + info["seconds"],
            mean_layer_mse(tables, mse_images))

    # the chapter's e2e recipe
    if sc.e2e_epochs > 0:
        t0 = time.time()
        if sc.e2e_layer_epochs > 0:
            e2e = copy.deepcopy(teacher)
            progressive_convert_(e2e, cfg, calib, teacher=teacher, calib_images=kmeans_images,
                                 calib_rows=sc.kmeans_rows,
                                 epochs_per_layer=sc.e2e_layer_epochs, skip=dense_layers(teacher), seed=seed,
                                 batch_size=sc.batch_size, augment=augment_crop_flip, **recipe)
            base_seconds = 0.0
        else:  # progressive conversion without per-layer tuning = the k-means model (same layer-wise calibration)
            e2e, base_seconds = copy.deepcopy(kmeans), km_seconds
        finetune_e2e_(e2e, calib, teacher=teacher, epochs=sc.e2e_epochs, batch_size=sc.batch_size,
                      augment=augment_crop_flip, seed=seed, **recipe)
        add("e2e", e2e, base_seconds + time.time() - t0,
            mean_layer_mse(e2e, mse_images))

    df = pd.DataFrame(rows)
    df.attrs["calib_index"] = calib_idx
    df.attrs["held_out_index"] = held_idx
    df.attrs["pq_layer_names"] = [n for n, _ in pq_layers(kmeans)]
    df.attrs["dense_layer_names"] = [n for n in convs + dense if n not in df.attrs["pq_layer_names"]]
    return df


def params_for(scale: str, n_prototypes: int, subvec_len: int, seed: int, df: pd.DataFrame | None = None) -> dict:
    """The parameters recorded in the results file's provenance."""
    attrs = {} if df is None else df.attrs
    return {"scale": asdict(SCALES[scale]), "n_prototypes": n_prototypes, "subvec_len": subvec_len,
            "seed": seed, "pq_layers": attrs.get("pq_layer_names"), "dense_layers": attrs.get("dense_layer_names"),
            "tau": E2E_RECIPE["tau"], "e2e_recipe": E2E_RECIPE,
            "split": "CIFAR-10 test set halved with torch.randperm(seed): calibration / held_out",
            "model": "pip cifar-10-model 7.4.0 cifar_10_model/trained_models/cnn_model.h5"}


def main(argv=None) -> int:
    """``python -m effllm_lib.pq.pretrained --scale full [--out DIR]``: run and save ``pqa/pretrained_cnn``."""
    from .. import results

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--scale", default="ci", choices=sorted(SCALES))
    ap.add_argument("--n-prototypes", type=int, default=PAPER_RESNET20_SETTING[0])
    ap.add_argument("--subvec-len", type=int, default=PAPER_RESNET20_SETTING[1])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None, help="write <out>/pretrained_cnn.csv instead of data/results")
    args = ap.parse_args(argv)
    t0 = time.time()
    df = pretrained_pq(args.scale, n_prototypes=args.n_prototypes, subvec_len=args.subvec_len,
                       device=args.device, seed=args.seed, verbose=True)
    path = None if args.out is None else Path(args.out) / f"{NAME}.csv"
    written = results.save(df, CHAPTER, NAME, params=params_for(args.scale, args.n_prototypes, args.subvec_len,
                                                                 args.seed, df),
                           scale=args.scale, path=path)
    print(df.to_string(index=False))
    print(f"wrote {written} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
