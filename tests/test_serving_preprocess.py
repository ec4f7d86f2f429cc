"""Preprocessing: header parsing against Pillow, two decoders against each other, bad input by status."""

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from effllm_lib.serving import preprocess as pp
from effllm_lib.serving.images import synthetic_jpeg


def patch_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the frame size in a baseline JPEG's SOF0 header (a cheap 'huge image')."""
    i = data.index(b"\xff\xc0")
    return data[:i + 5] + struct.pack(">HH", height, width) + data[i + 9:]


@pytest.mark.parametrize("w,h,progressive", [(64, 48, False), (333, 101, True), (1, 1, False)])
def test_jpeg_size_matches_pillow(w, h, progressive):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", progressive=progressive)
    data = buf.getvalue()
    assert pp.jpeg_size(data) == Image.open(io.BytesIO(data)).size == (w, h)


def test_bad_images_get_the_right_status():
    good = synthetic_jpeg(80, 60)
    cases = {
        b"": 415, b"GIF89a...": 415, good[: len(good) // 2]: 400,  # truncated
        good[:2] + b"\x00" * 50: 400,                            # corrupt after SOI
        patch_size(good, 60000, 60000): 413,                     # 3.6 gigapixels claimed
    }
    for data, status in cases.items():
        with pytest.raises(pp.BadImage) as err:
            pp.check_jpeg(data)
        assert err.value.status == status, (data[:10], str(err.value))
    assert pp.check_jpeg(good) == (80, 60)


def test_corrupt_scan_data_is_a_400_from_the_decoder():
    good = bytearray(synthetic_jpeg(64, 64))
    sos = good.index(b"\xff\xda")
    bad = bytes(good[: sos + 2]) + b"\x00\x02" + bytes(good[sos + 4:])  # SOS header length 2 is invalid
    with pytest.raises(pp.BadImage) as err:
        pp.decode(bad, "pil")
    assert err.value.status == 400


def test_pillow_and_opencv_decode_the_same_pixels():
    pytest.importorskip("cv2")
    data = synthetic_jpeg(320, 240, seed=3)
    a = np.asarray(pp.decode(data, "pil"), dtype=np.int16)
    b = pp.decode(data, "opencv").astype(np.int16)
    assert a.shape == b.shape == (240, 320, 3)
    assert np.abs(a - b).mean() < 1.5  # both libjpeg-based; IDCT / upsampling rounding differ slightly


@pytest.mark.parametrize("decoder", ["pil", "opencv", "turbo"])
def test_reduced_decode_approximates_full_decode(decoder):
    if decoder in ("opencv", "turbo"):
        pytest.importorskip("cv2")  # resizes arrays
    data = synthetic_jpeg(1600, 1200, seed=1)
    full = pp.to_uint8_chw(pp.resize(pp.decode(data, decoder), (224, 224))).float()
    fast = pp.resize(pp.decode(data, decoder, target=(224, 224), reduced=True), (224, 224))
    assert (np.asarray(pp.decode(data, decoder, target=(224, 224), reduced=True)).shape[0]) == 300  # 1/4 scale
    assert (full - pp.to_uint8_chw(fast).float()).abs().mean() < 4


def test_reduction_factor_hand_cases():
    assert pp._reduction((5120, 2880), (224, 224)) == 8
    assert pp._reduction((1000, 1000), (224, 224)) == 4
    assert pp._reduction((300, 300), (224, 224)) == 1
    assert pp._reduction((720, 1440), (512, 512)) == 1


def test_normalize_hand_computed():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2).contiguous()
    y = pp.normalize(x, (0.5, 0.5, 0.2), (0.25, 0.5, 0.1))
    expect = torch.tensor([(0 - 0.5) / 0.25, (1 - 0.5) / 0.5, (0.2 - 0.2) / 0.1]).view(3, 1, 1)
    assert torch.allclose(y, expect.expand(3, 2, 2), atol=1e-6)
    with pytest.raises(TypeError):
        pp.normalize(x.float(), (0.5,) * 3, (0.5,) * 3)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="decoder"):
        pp.PreprocessConfig(decoder="libvips")
    with pytest.raises(ValueError, match="normalize_on"):
        pp.PreprocessConfig(normalize_on="gpu")


@pytest.mark.parametrize("pin", [False, True])
def test_to_device_cpu_stacks_the_batch_either_way(pin):
    batch = [torch.full((3, 2, 2), i, dtype=torch.uint8) for i in range(3)]
    x = pp.to_device(batch, "cpu", pin_memory=pin)
    assert x.device.type == "cpu" and x.shape == (3, 3, 2, 2) and x.dtype == torch.uint8
    assert [int(x[i].unique()) for i in range(3)] == [0, 1, 2]  # order kept, values unchanged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pin", [False, True])
def test_to_device_cuda_pinned_and_pageable_agree(pin):
    batch = [torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8) for _ in range(4)]
    x = pp.to_device(batch, "cuda", pin_memory=pin)
    assert x.device.type == "cuda"
    assert torch.equal(x.cpu(), torch.stack(batch))


def test_to_device_rejects_bad_input():
    with pytest.raises(TypeError, match="pin_memory"):
        pp.to_device([torch.zeros(1)], "cpu", pin_memory="yes")
    with pytest.raises(ValueError, match="at least one"):
        pp.to_device([], "cpu")


def test_config_pin_memory_switch():
    assert pp.PreprocessConfig().pin_memory is True
    assert pp.PreprocessConfig(pin_memory=False).pin_memory is False
    with pytest.raises(TypeError, match="pin_memory"):
        pp.PreprocessConfig(pin_memory=1)


def test_turbo_decodes_the_same_pixels_as_pillow():
    data = synthetic_jpeg(320, 240, seed=4)
    a = np.asarray(pp.decode(data, "pil"), dtype=np.int16)
    b = pp.decode(data, "turbo").astype(np.int16)
    assert a.shape == b.shape == (240, 320, 3)
    assert np.abs(a - b).mean() < 1.5  # both libjpeg-turbo; default IDCT / upsampling settings may differ


def cut_and_closed(data: bytes) -> bytes:
    """A file cut in the middle of its scan and closed with an end-of-image marker: the header checks pass,
    and libjpeg recovers (grey blocks) with only a warning."""
    return data[: len(data) // 2] + b"\xff\xd9"


@pytest.mark.parametrize("decoder", ["pil", "opencv", "turbo"])
def test_a_scan_cut_short_is_an_error_when_strict(decoder):
    pytest.importorskip("cv2")
    good = synthetic_jpeg(400, 300, seed=2)
    bad = cut_and_closed(good)
    assert pp.check_jpeg(bad) == (400, 300)  # the cheap header checks cannot see it
    with pytest.raises(pp.BadImage, match="premature end") as err:
        pp.decode(bad, decoder)
    assert err.value.status == 400
    # lenient libjpeg (the paper's servers) returns pixels that differ from the photo: the reason for strict
    lenient = np.asarray(pp.decode(bad, decoder, strict=False), dtype=np.int16)
    full = np.asarray(pp.decode(good, decoder), dtype=np.int16)
    assert lenient.shape == full.shape and np.abs(lenient - full)[-50:].mean() > 10


def test_two_frame_headers_are_refused():
    good = synthetic_jpeg(64, 48)
    i = good.index(b"\xff\xc0")
    (length,) = struct.unpack(">H", good[i + 2:i + 4])
    sof = good[i:i + 2 + length]
    huge = sof[:5] + struct.pack(">HH", 65000, 65000) + sof[9:]
    with pytest.raises(pp.BadImage, match="more than one frame header") as err:
        pp.check_jpeg(good[:i + 2 + length] + huge + good[i + 2 + length:])
    assert err.value.status == 400


def test_config_strict_switch():
    assert pp.PreprocessConfig().strict is True
    with pytest.raises(TypeError, match="strict"):
        pp.PreprocessConfig(strict="no")
