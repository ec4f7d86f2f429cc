"""What DCT-domain reduced decoding costs in accuracy: full decode + resize vs reduced decode + resize.

The optimized server decodes a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain (``preprocess.decode(...,
reduced=True)``, Pillow's ``draft``) before the resize. That is only a free optimization if the model's
answers do not change; this module measures how much they do, with the server's own decode and resize code.

Two sets, since no ImageNet-labelled photographs exist offline (see the chapter's notes on assets):

* ``cifar``: the labelled CIFAR-10 test set (at full scale a class-balanced 2,500 of its 10,000 images, as many
  as the build machine's CPU allows; see ``SCALES``) and the packaged Keras CIFAR-10 CNN (``pq.keras_cnn``,
  32x32 input). Each 32x32 image is upscaled ``factor`` times (bicubic) and saved as a
  JPEG (quality 90, 4:2:0 chroma), the request a client would send; the server decodes it fully and resizes
  to 32x32, or lets libjpeg decode at 1/``factor`` scale (exactly 32x32) and resizes. Top-1 accuracy of
  both on the true labels, and the paired bootstrap interval of the change (``stats.paired_difference_ci``).
  Caveat: an upscaled image has no detail finer than the original 32x32 grid, which real camera JPEGs do,
  so this set can understate the change; the second set has real detail and no labels.
* ``photos``: the distinct photographs of the wallpapers asset (real camera JPEGs, 1 to 15 MP) through the
  packaged ImageNet MobileNetV2 (224x224): no labels exist, so the measure is top-1 *agreement* of reduced
  with full decoding, and the change in the full-decode top-1 class's probability.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .. import stats
from . import preprocess as pp

SCALES = {
    "ci": {"cifar_scale": "ci", "cifar_images": 300, "factors": (8,), "photos": 3, "quality": 90, "n_boot": 1000},
    # 2,500 of the 10,000 test images (the first 250 of each class): the Keras CNN costs ~0.15 GFLOP an image and
    # runs 7 times per image (original + full and reduced at 3 factors), ~5 CPU-minutes on the 2-core build box
    "full": {"cifar_scale": "full", "cifar_images": 2_500, "factors": (2, 4, 8), "photos": None, "quality": 90,
             "n_boot": 2000},
}


def per_class_subset(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first ``n / classes`` images of each class (in test-set order): a class-balanced subset."""
    classes = np.unique(labels)
    if n % len(classes):
        raise ValueError(f"n={n} is not a multiple of the {len(classes)} classes")
    k = n // len(classes)
    idx = [np.flatnonzero(labels == c)[:k] for c in classes]
    if any(len(i) < k for i in idx):
        raise ValueError(f"some class has fewer than {k} images")
    return np.sort(np.concatenate(idx))


def upscaled_jpeg(img: np.ndarray, factor: int, quality: int = 90) -> bytes:
    """An HxWx3 uint8 image upscaled ``factor`` times (bicubic) and saved as a JPEG (4:2:0)."""
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    big = Image.fromarray(img).resize((w * factor, h * factor), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=quality, subsampling=2)
    return buf.getvalue()


def server_pixels(data: bytes, size: tuple[int, int], *, reduced: bool, decoder: str = "pil",
                  strict: bool = True) -> np.ndarray:
    """The pixels a server with this decoder feeds its model: ``preprocess.decode`` + ``preprocess.resize``.
    (``strict`` only adds a check that raises on a damaged file: a valid JPEG gives the same pixels.)"""
    img = pp.resize(pp.decode(data, decoder, target=size, reduced=reduced, strict=strict), size)
    return np.array(img, dtype=np.uint8)  # a writable copy (torch.from_numpy warns on Pillow's read-only buffer)


@torch.no_grad()
def _predict(model, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([torch.softmax(model(x[i:i + batch]).float(), 1) for i in range(0, len(x), batch)])


def cifar_rows(images: np.ndarray, labels: np.ndarray, factors=(2, 4, 8), quality: int = 90,
               model=None) -> pd.DataFrame:
    """One row per (factor, image): label, the top-1 class with full and with reduced decoding, and with no
    JPEG round trip at all (the original 32x32 pixels: the model's own accuracy, a reference)."""
    from ..pq.keras_cnn import load_keras_cifar_cnn, to_input

    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(f"need as many labels as images (>0), got {len(images)} and {len(labels)}")
    model = model if model is not None else load_keras_cifar_cnn()
    size = images.shape[1:3]
    pred_original = _predict(model, to_input(images)).argmax(1).numpy()
    frames = []
    for f in factors:
        full, red = [], []
        for img in images:
            # our own encoder's output is a valid JPEG: the strict check (a second entropy-decoding pass with
            # Pillow) would change no pixel, so it is skipped here to halve the run time
            data = upscaled_jpeg(img, int(f), quality)
            full.append(server_pixels(data, size, reduced=False, strict=False))
            red.append(server_pixels(data, size, reduced=True, strict=False))
        p_full = _predict(model, to_input(np.stack(full)))
        p_red = _predict(model, to_input(np.stack(red)))
        # the Keras net's last layer is a ReLU: ties at 0 go to the first class, as NumPy's argmax does
        frames.append(pd.DataFrame({"factor": int(f), "image": np.arange(len(images)), "label": labels,
                                    "pred_original": pred_original, "pred_full": p_full.argmax(1).numpy(),
                                    "pred_reduced": p_red.argmax(1).numpy(),
                                    "pixel_mad": [float(np.abs(a.astype(int) - b).mean()) for a, b in zip(full, red)]}))
        print(f"factor {f}: {len(images)} images done", flush=True)
    out = pd.concat(frames, ignore_index=True)
    out["correct_original"] = (out.pred_original == out.label).astype(int)
    out["correct_full"] = (out.pred_full == out.label).astype(int)
    out["correct_reduced"] = (out.pred_reduced == out.label).astype(int)
    return out


def photo_rows(photos: list[tuple[str, bytes]], model=None, spec=None) -> pd.DataFrame:
    """One row per photo: MobileNetV2's top-1 class with full and with reduced decoding, and the probability
    each decoding gives the full decoding's top-1 class."""
    from .models import build

    if not photos:
        raise ValueError("no photos")
    if model is None:
        model, spec = build("mobilenet_v2", pretrained=True)
    rows = []
    for name, data in photos:
        w, h = pp.jpeg_size(data)
        xs = [pp.normalize(pp.to_uint8_chw(server_pixels(data, spec.input_size, reduced=r)), spec.mean, spec.std)
              for r in (False, True)]
        p = _predict(model, torch.stack(xs))
        top = int(p[0].argmax())
        rows.append({"photo": name, "width": w, "height": h, "dct_scale": pp._reduction((w, h), spec.input_size),
                     "top1_full": top, "top1_reduced": int(p[1].argmax()), "prob_full": float(p[0, top]),
                     "prob_reduced": float(p[1, top])})
    out = pd.DataFrame(rows)
    out["agree"] = (out.top1_full == out.top1_reduced).astype(int)
    return out


def summarize(cifar: pd.DataFrame, photos: pd.DataFrame, n_boot: int = 2000) -> pd.DataFrame:
    """One row per CIFAR factor (accuracy with each decoding, the change in percentage points with its paired
    95% bootstrap interval, agreement) and one for the photos (agreement and probability change)."""
    rows = []
    for f, g in cifar.groupby("factor"):
        d, lo, hi = stats.paired_difference_ci(g.correct_reduced, g.correct_full, n_boot=n_boot)
        agree = (g.pred_full == g.pred_reduced).astype(float)
        a, alo, ahi = stats.mean_ci(agree, n_boot=n_boot)
        rows.append({"set": "CIFAR-10 test, Keras CNN", "factor": int(f), "n": len(g),
                     "top1_original": 100 * g.correct_original.mean(), "top1_full": 100 * g.correct_full.mean(),
                     "top1_reduced": 100 * g.correct_reduced.mean(),
                     "change_pp": 100 * d, "change_lo_pp": 100 * lo, "change_hi_pp": 100 * hi,
                     "agreement": 100 * a, "agreement_lo": 100 * alo, "agreement_hi": 100 * ahi,
                     "pixel_mad": g.pixel_mad.mean()})
    if len(photos):
        a, alo, ahi = stats.mean_ci(photos.agree.astype(float), n_boot=n_boot)
        d, lo, hi = stats.paired_difference_ci(photos.prob_reduced, photos.prob_full, n_boot=n_boot)
        rows.append({"set": "wallpaper photos, MobileNetV2", "factor": np.nan, "n": len(photos),
                     "top1_full": np.nan, "top1_reduced": np.nan, "change_pp": np.nan, "change_lo_pp": np.nan,
                     "change_hi_pp": np.nan, "agreement": 100 * a, "agreement_lo": 100 * alo,
                     "agreement_hi": 100 * ahi, "prob_change": d, "prob_change_lo": lo, "prob_change_hi": hi})
    return pd.DataFrame(rows)


def exact_lower_bound(k: int, n: int, level: float = 0.95) -> float:
    """Clopper-Pearson lower bound of a proportion from ``k`` successes in ``n`` (two-sided ``level``): where
    every photo agrees, a bootstrap interval collapses to a point, but the data still allow a lower rate.
    Solved by bisection on the binomial tail, P(X >= k | p) = (1 - level) / 2 (no scipy in the environment)."""
    from math import comb

    if not (isinstance(k, (int, np.integer)) and isinstance(n, (int, np.integer)) and 0 <= k <= n and n > 0):
        raise ValueError(f"need integers 0 <= k <= n, n > 0; got k={k!r}, n={n!r}")
    if k == 0:
        return 0.0
    tail = (1 - level) / 2

    def upper_tail(p):
        return sum(comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))

    lo, hi = 0.0, 1.0
    for _ in range(60):  # upper_tail rises with p
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if upper_tail(mid) < tail else (lo, mid)
    return (lo + hi) / 2


def distinct_photos(n: int | None = None) -> list[tuple[str, bytes]]:
    """The distinct photographs of the wallpapers asset (one per file), largest first."""
    from .. import assets

    seen, out = set(), []
    for path in assets.wallpapers():
        data = path.read_bytes()
        if data in seen:
            continue
        seen.add(data)
        out.append((f"{path.parent.parent.parent.name}/{path.parent.name}/{path.stem}", data))
    out.sort(key=lambda t: -np.prod(pp.jpeg_size(t[1])))
    return out[:n] if n else out


def run(scale: str = "ci", *, save: bool = False, tag: str = "") -> dict:
    """Both sets at ``scale``; with ``save`` writes ``reduced_decode_accuracy`` (summary) and
    ``reduced_decode_cifar`` / ``reduced_decode_photos`` (per item)."""
    import time

    from .. import assets, results

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}")
    p = SCALES[scale]
    t0 = time.time()
    images, labels = assets.cifar10_test(p["cifar_scale"])
    keep = per_class_subset(labels, p["cifar_images"])
    images, labels = images[keep], labels[keep]
    cifar = cifar_rows(images, labels, p["factors"], p["quality"])
    photos = photo_rows(distinct_photos(p["photos"]))
    summary = summarize(cifar, photos, n_boot=p["n_boot"])
    out = {"cifar": cifar, "photos": photos, "summary": summary}
    if save:
        extra = {"minutes": round((time.time() - t0) / 60, 1), "decoder": "pil (Pillow draft for reduced)",
                 "resize": "preprocess.resize (Pillow bilinear, antialiased)",
                 "strict_jpeg": "photos: strict; CIFAR JPEGs (our own encoder's): unchecked, same pixels"}
        for name, key in (("reduced_decode_cifar", "cifar"), ("reduced_decode_photos", "photos"),
                          ("reduced_decode_accuracy", "summary")):
            results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Accuracy cost of DCT-domain reduced JPEG decoding (full vs reduced).")
    ap.add_argument("--scale", choices=sorted(SCALES), default="ci")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the results names")
    args = ap.parse_args(argv)
    out = run(args.scale, save=not args.no_save, tag=args.tag)
    print(out["summary"].round(3).T.to_string())


if __name__ == "__main__":
    main()
