"""Reduced-size JPEG decoding vs full decoding: the pixels match block averages, and the accuracy bookkeeping
matches hand-counted cases."""
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from effllm_lib.serving import reduced_accuracy as R


def test_upscaled_jpeg_size_and_bad_factor():
    img = np.zeros((32, 32, 3), np.uint8)
    with Image.open(io.BytesIO(R.upscaled_jpeg(img, 4))) as im:
        assert im.size == (128, 128) and im.format == "JPEG"
    with pytest.raises(ValueError, match="factor"):
        R.upscaled_jpeg(img, 0)
    with pytest.raises(ValueError, match="uint8"):
        R.upscaled_jpeg(img.astype(np.float32), 2)


def test_reduced_decode_is_close_to_block_means_of_the_full_decode():
    rng = np.random.default_rng(0)
    coarse = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    data = R.upscaled_jpeg(np.asarray(Image.fromarray(coarse).resize((32, 32), Image.BICUBIC)), 8)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=float)  # 256 x 256
    block_means = full.reshape(32, 8, 32, 8, 3).mean(axis=(1, 3))  # the DC term of each 8x8 block
    reduced = R.server_pixels(data, (32, 32), reduced=True)
    assert reduced.shape == (32, 32, 3)
    # 1/8-scale IDCT = the block's DC coefficient; chroma upsampling and rounding leave a small gap
    assert np.abs(reduced - block_means).mean() < 3
    # ... and the two decodings differ (else the experiment would measure nothing)
    assert np.abs(R.server_pixels(data, (32, 32), reduced=False).astype(int) - reduced).mean() > 0


class DominantChannel(torch.nn.Module):
    """A hand-made 'classifier': class = the colour channel with the largest mean (input 0..255 NCHW)."""

    def forward(self, x):
        m = x.mean(dim=(2, 3))
        return torch.nn.functional.one_hot(m.argmax(1), 3).float() * 10


def test_cifar_rows_count_correct_answers():
    imgs = np.zeros((4, 32, 32, 3), np.uint8)
    for i, c in enumerate((0, 1, 2, 0)):
        imgs[i, :, :, c] = 200
    labels = np.array([0, 1, 2, 1])  # the last one is labelled wrong on purpose
    rows = R.cifar_rows(imgs, labels, factors=(2, 8), model=DominantChannel())
    assert len(rows) == 8 and set(rows.factor) == {2, 8}
    for col in ("correct_original", "correct_full", "correct_reduced"):
        assert rows.groupby("factor")[col].sum().tolist() == [3, 3]
    with pytest.raises(ValueError, match="labels"):
        R.cifar_rows(imgs, labels[:2], model=DominantChannel())


def test_summarize_change_and_agreement_by_hand():
    cifar = pd.DataFrame({"factor": 8, "image": range(4), "label": 0, "pred_original": 0,
                          "pred_full": [0, 0, 1, 1], "pred_reduced": [0, 1, 0, 0], "pixel_mad": 1.0,
                          "correct_original": 1, "correct_full": [1, 1, 0, 0], "correct_reduced": [1, 0, 1, 1]})
    photos = pd.DataFrame({"agree": [1, 1, 0, 1], "prob_full": [0.5, 0.6, 0.7, 0.8],
                           "prob_reduced": [0.5, 0.5, 0.7, 0.9]})
    s = R.summarize(cifar, photos, n_boot=500).set_index("set")
    c = s.loc["CIFAR-10 test, Keras CNN"]
    assert (c.top1_full, c.top1_reduced, c.top1_original) == (50, 75, 100)
    assert c.change_pp == pytest.approx(25) and c.change_lo_pp <= 25 <= c.change_hi_pp
    assert c.agreement == pytest.approx(25)  # only image 0 keeps its answer
    p = s.loc["wallpaper photos, MobileNetV2"]
    assert p.agreement == pytest.approx(75) and p.prob_change == pytest.approx(0.0)


def test_bad_scale():
    with pytest.raises(ValueError, match="scale"):
        R.run("huge")


@pytest.mark.slow
def test_ci_run_on_the_packaged_models():
    out = R.run("ci")
    s = out["summary"]
    assert len(out["cifar"]) == 300 and s.n.tolist()[0] == 300
    # the packaged CIFAR CNN scores ~80% on clean test images: far above chance whatever the decoding
    assert s.top1_original.iloc[0] > 60 and s.top1_full.iloc[0] > 40 and s.top1_reduced.iloc[0] > 40


def test_strict_check_changes_no_pixel_of_a_valid_jpeg():
    img = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    data = R.upscaled_jpeg(img, 4)
    for reduced in (False, True):
        assert np.array_equal(R.server_pixels(data, (32, 32), reduced=reduced, strict=True),
                              R.server_pixels(data, (32, 32), reduced=reduced, strict=False))


def test_per_class_subset_is_balanced_and_in_order():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1])
    assert R.per_class_subset(labels, 6).tolist() == [0, 1, 2, 3, 4, 6]
    with pytest.raises(ValueError, match="multiple"):
        R.per_class_subset(labels, 4)
    with pytest.raises(ValueError, match="fewer"):
        R.per_class_subset(labels, 12)


def test_exact_lower_bound_matches_closed_forms():
    # all n agree: P(X = n | p) = p**n = 0.025  ->  p = 0.025 ** (1 / n)
    assert R.exact_lower_bound(24, 24) == pytest.approx(0.025 ** (1 / 24), abs=1e-9)
    # k = 1 of n: P(X >= 1 | p) = 1 - (1 - p)**n = 0.025
    assert R.exact_lower_bound(1, 10) == pytest.approx(1 - 0.975 ** 0.1, abs=1e-9)
    assert R.exact_lower_bound(0, 10) == 0.0
    with pytest.raises(ValueError):
        R.exact_lower_bound(11, 10)
