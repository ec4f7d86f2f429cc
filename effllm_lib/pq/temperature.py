"""The paper's temperature study with a soft forward pass, prototypes-only training and layer MSE on float inputs.

    python -m effllm_lib.pq.temperature --scale cpu --seeds 0 1     # writes data/results/pqa/temperature_sweep_kws

One network (default the KWS shape on Fashion-MNIST, the paper's N_p 16, L_s 4) is trained in float, product-
quantized and k-means-calibrated, then fine-tuned once per (training mode, forward pass, temperature tau):

* forward ``soft``: during training the layer's output is the softmax(-distance / tau)-weighted sum of table rows
  (PECAN-style, differentiable); ``straight_through``: the hard output, with the soft assignment's gradient.
  Every accuracy is read with the hard (argmin) assignment, as the hardware computes it.
* mode ``both`` (prototypes and LUT trained) and ``prototypes_derived`` (the paper's "prototypes only": the LUT is
  recomputed from the prototypes, LUT = P . W, in every step).

Protocol as in ``sweeps``: a validation split carved off the training images (choices are made on
``val_accuracy``), BatchNorm statistics re-estimated before every evaluation of a PQ model, the held-out set
read once per row, with a 95% percentile-bootstrap interval over its images (``accuracy_lo/hi``); seeds vary the
training, and ``summary`` adds the mean and 95% t-interval over them.

The ``mse`` rows (first seed): the mean layer-output MSE of k-means tables over an (N_p, L_s) grid, two ways:
``layer_mse_float``, every layer calibrated and measured on the float network's activations (its own error, the
paper's study), and ``layer_mse``, calibrated and measured on the already-quantized prefix's (as in ``sweeps``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from . import cnn, sweeps
from .layers import FORWARDS, PQConfig, pq_convert_, set_forward_, set_tau_
from .train import calibrate_, finetune_, mean_layer_mse, recalibrate_bn_, train_float

RUNS = (("both", "soft"), ("both", "straight_through"), ("prototypes_derived", "straight_through"),
        ("prototypes_derived", "soft"))


@dataclass
class TempScale:
    n_train: int | None           # training images before the validation split (None = all)
    n_test: int                   # held-out images
    float_epochs: float
    finetune_epochs: float
    taus: tuple = sweeps.TAUS
    runs: tuple = RUNS            # (training mode, forward pass) pairs, each at every tau
    batch_size: int = 64
    n_calib: int = 1024
    n_bn: int = 2048              # training images the BN statistics are re-estimated on
    mse_np: tuple = (4, 8, 16, 32, 64)
    mse_ls: tuple = (2, 4, 8, 16)
    val_fraction: float = 0.1
    n_boot: int = 1000

    def __post_init__(self):
        for mode, forward in self.runs:
            if mode not in ("lut", "prototypes", "prototypes_derived", "both") or forward not in FORWARDS:
                raise ValueError(f"runs must be (training mode, forward) pairs with forward in {FORWARDS}, "
                                 f"got {(mode, forward)!r}")
        if not all(t > 0 for t in self.taus):
            raise ValueError(f"taus must be positive, got {self.taus}")


SCALES = {
    # about a minute on 2 cores: two temperatures, two MSE settings
    "ci": TempScale(n_train=1200, n_test=300, float_epochs=2, finetune_epochs=0.1, taus=(0.01, 1.0),
                    runs=RUNS[:3], n_calib=256, n_bn=256, mse_np=(4, 16), mse_ls=(4,), n_boot=200),
    # the committed CPU run: about 10 CPU-minutes a seed (the MSE grid with the first seed), sized for a 2-core
    # machine shared by many jobs; short fine-tunes (0.25 epoch of 7,200 images = 28 steps of 64)
    "cpu": TempScale(n_train=8000, n_test=1500, float_epochs=3, finetune_epochs=0.25, runs=RUNS[:3],
                     n_bn=1024, mse_np=(4, 16, 64), mse_ls=(2, 4, 8)),
    # the device run: all of Fashion-MNIST, the sweeps' full schedules
    "full": TempScale(n_train=None, n_test=10000, float_epochs=15, finetune_epochs=1, batch_size=128,
                      n_calib=2048, n_bn=4096),
}


def scale_for(scale) -> TempScale:
    if isinstance(scale, TempScale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    return SCALES[scale]


@torch.no_grad()
def correct(model: torch.nn.Module, data, batch_size: int = 512) -> torch.Tensor:
    """Per image: is the model's top-1 class the label (bool tensor), in eval mode (hard PQ assignment)."""
    images, labels = data
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"correct needs matching non-empty images/labels, got {len(images)}/{len(labels)}")
    was = model.training
    model.eval()
    hits = torch.cat([model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]
                      for i in range(0, len(images), batch_size)])
    model.train(was)
    return hits.cpu()


def bootstrap_interval(hits, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval (%) of the accuracy of per-image ``hits``, resampling the test images."""
    hits = np.asarray(hits, dtype=float)
    if hits.ndim != 1 or len(hits) == 0:
        raise ValueError(f"bootstrap_interval needs a non-empty 1-D array of hits, got shape {hits.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    rng = np.random.default_rng(seed)
    means = hits[rng.integers(0, len(hits), size=(n_boot, len(hits)))].mean(1) * 100
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def run(network: str = "kws", scale="ci", *, seed: int = 0, device: str = "cpu", cifar_images=None,
        cifar_labels=None, mse_grid: bool = True, verbose: bool = False, checkpoint=None) -> pd.DataFrame:
    """The temperature study of the module docstring for one seed; returns one row per evaluated model.
    ``checkpoint(df)``, if given, gets the rows so far after the temperature rows (before the MSE grid)."""
    sc = scale_for(scale)
    if network not in sweeps.PAPER_SETTING:
        raise ValueError(f"unknown network {network!r}; expected one of {sorted(sweeps.PAPER_SETTING)}")
    data_scale = sweeps.Scale(n_train=sc.n_train, n_test=sc.n_test, float_epochs=sc.float_epochs,
                              finetune_epochs=sc.finetune_epochs, val_fraction=sc.val_fraction)
    torch.manual_seed(seed)
    train, test = sweeps.load_data(network, data_scale, cifar_images, cifar_labels)
    train, val = sweeps.split_validation(train, sc.val_fraction)
    train, val, test = (tuple(t.to(device) for t in d) for d in (train, val, test))
    calib, bn_images = train[0][:sc.n_calib], train[0][:sc.n_bn]
    log = print if verbose else (lambda *a, **k: None)
    rows = []

    def evaluate(model, recalibrate=True):
        if recalibrate:
            recalibrate_bn_(model, bn_images)
        hits = correct(model, test)
        lo, hi = bootstrap_interval(hits, sc.n_boot, seed=seed)
        return {"val_accuracy": float(correct(model, val).float().mean()) * 100,
                "accuracy": float(hits.float().mean()) * 100, "accuracy_lo": lo, "accuracy_hi": hi}

    def row(experiment, accs, **kw):
        base = {"network": network, "seed": seed, "experiment": experiment, "mode": None, "forward": None,
                "tau": None, "n_prototypes": n_p, "subvec_len": l_s, "layer_mse": None, "layer_mse_float": None}
        rows.append({**base, **kw, **accs, "float_accuracy": float_acc})
        return rows[-1]

    t0 = time.time()
    n_p, l_s = sweeps.PAPER_SETTING[network]
    float_model = cnn.MODELS[network]().to(device)
    train_float(float_model, train, epochs=sc.float_epochs, seed=seed, batch_size=sc.batch_size,
                augment=sweeps._augment(network, sweeps.scale_for(network, "ci")))
    float_accs = evaluate(float_model, recalibrate=False)
    float_acc = float_accs["accuracy"]
    row("float", float_accs, seconds=time.time() - t0)
    log(f"{network} seed {seed}: float {float_acc:.2f}% ({time.time() - t0:.0f}s)")
    base = sweeps.pq_model(float_model, n_p, l_s, calib, seed=seed)
    r = row("temperature", evaluate(base), mode="kmeans", layer_mse=mean_layer_mse(base, calib[:256]))
    log(f"  kmeans: {r['accuracy']:.2f}")
    for mode, forward in sc.runs:
        for tau in sc.taus:
            t = time.time()
            model = copy.deepcopy(base)
            set_tau_(set_forward_(model, forward), tau)
            finetune_(model, train, mode=mode, epochs=sc.finetune_epochs, seed=seed, teacher=float_model,
                      batch_size=sc.batch_size)
            r = row("temperature", evaluate(model), mode=mode, forward=forward, tau=tau, seconds=time.time() - t)
            log(f"  {mode} {forward} tau {tau:g}: val {r['val_accuracy']:.2f} held-out {r['accuracy']:.2f} "
                f"[{r['accuracy_lo']:.2f}, {r['accuracy_hi']:.2f}] ({r['seconds']:.0f}s)")
    if checkpoint is not None:
        checkpoint(pd.DataFrame(rows))
    if mse_grid:
        for g_np in sc.mse_np:
            for g_ls in sc.mse_ls:
                t = time.time()
                # prefix-quantized: k-means on the PQ prefix's activations, MSE there (what the sweeps record)
                model = sweeps.pq_model(float_model, g_np, g_ls, calib, seed=seed)
                mse = mean_layer_mse(model, calib[:256])
                # float: every layer's k-means and MSE on the float network's activations (its own error)
                model = copy.deepcopy(float_model)
                pq_convert_(model, PQConfig(n_prototypes=g_np, subvec_len=g_ls))
                calibrate_(model, calib, seed=seed, inputs="float")
                rows.append({"network": network, "seed": seed, "experiment": "mse", "mode": "kmeans",
                             "n_prototypes": g_np, "subvec_len": g_ls, "float_accuracy": float_acc,
                             "layer_mse": mse, "layer_mse_float": mean_layer_mse(model, calib[:256], "float"),
                             "seconds": time.time() - t})
        log(f"  mse grid: {len(sc.mse_np) * len(sc.mse_ls)} settings")
    log(f"{network} seed {seed}: total {time.time() - t0:.0f}s")
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (mode, forward, tau) of the temperature rows: accuracy mean over seeds with its 95% t-interval
    (``seed_ci95``, None for one seed), the mean bootstrap interval over the test set, and validation accuracy."""
    t = df[df.experiment == "temperature"].fillna({"forward": "-", "tau": 0.0})
    out = []
    for (mode, forward, tau), g in t.groupby(["mode", "forward", "tau"], sort=False):
        mean, half = sweeps.mean_interval(g.accuracy)
        out.append({"mode": mode, "forward": forward, "tau": tau if tau else None, "n_seeds": len(g),
                    "accuracy": mean, "seed_ci95": half, "boot_lo": g.accuracy_lo.mean(),
                    "boot_hi": g.accuracy_hi.mean(), "val_accuracy": g.val_accuracy.mean(),
                    "float_accuracy": g.float_accuracy.mean()})
    return pd.DataFrame(out)


def mse_trend(df: pd.DataFrame) -> pd.DataFrame:
    """Spearman rank correlation of the ``mse`` rows' layer MSE with N_p and with L_s, per input kind."""
    m = df[df.experiment == "mse"]
    out = []
    for col, inputs in (("layer_mse_float", "float"), ("layer_mse", "quantized")):
        for knob in ("n_prototypes", "subvec_len"):
            out.append({"inputs": inputs, "knob": knob, "spearman": m[knob].rank().corr(m[col].rank())})
    return pd.DataFrame(out)


def main(argv=None) -> int:
    """``python -m effllm_lib.pq.temperature --scale cpu --seeds 0 1``: one ``temperature_sweep_<network>`` table
    (saved after every seed). ``--out DIR`` writes it there instead (a remote machine)."""
    import argparse
    from pathlib import Path

    from .. import results

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--scale", default="ci", choices=sorted(SCALES))
    ap.add_argument("--label", default=None, choices=["ci", "full"],
                    help="results scale label (default: ci for ci, full otherwise)")
    ap.add_argument("--network", default="kws", choices=sorted(sweeps.PAPER_SETTING))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cifar", help="npz with images/labels of the CIFAR-10 test set (resnet20)")
    ap.add_argument("--fashion", help="folder with the Fashion-MNIST idx .gz files (default: the asset)")
    ap.add_argument("--out", help="folder for the table (default: data/results/pqa)")
    args = ap.parse_args(argv)
    label = args.label or ("ci" if args.scale == "ci" else "full")
    if args.fashion:
        import os
        os.environ["EFFLLM_FASHION_MNIST_DIR"] = str(Path(args.fashion).resolve())
    cifar = (None, None)
    if args.network == "resnet20":
        if args.cifar:
            with np.load(args.cifar) as z:
                cifar = (z["images"], z["labels"])
        else:
            from .. import assets
            cifar = assets.cifar10_test("ci" if args.scale == "ci" else "full")
    table = f"temperature_sweep_{args.network}"
    path = Path(args.out) / f"{table}.csv" if args.out else None
    params = {"network": args.network, "scale": args.scale, "device": args.device,
              "setting": sweeps.PAPER_SETTING[args.network], "scale_params": asdict(scale_for(args.scale)),
              "torch_threads": torch.get_num_threads()}
    done = []
    for i, seed in enumerate(args.seeds):
        def checkpoint(df, i=i):  # a machine stopped mid-seed keeps that seed's temperature rows
            results.save(pd.concat([*done, df], ignore_index=True), "pqa", table, scale=label, path=path,
                         params={**params, "seeds": args.seeds[:i + 1], "partial": True})

        done.append(run(args.network, args.scale, seed=seed, device=args.device, cifar_images=cifar[0],
                        cifar_labels=cifar[1], verbose=True, mse_grid=i == 0, checkpoint=checkpoint))
        results.save(pd.concat(done, ignore_index=True), "pqa", table, scale=label, path=path,
                     params={**params, "seeds": args.seeds[:i + 1], "partial": i + 1 < len(args.seeds)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
