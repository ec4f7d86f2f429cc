"""Batched GPU decode (one nvJPEG call per batch) without a GPU: the option's checks, the clear error where
torchvision or CUDA is missing, and the failure isolation, with a fake batch decoder standing in for nvJPEG
(it fails a whole batch when one image is bad, as nvJPEG does)."""

import argparse
import io

import numpy as np
import pytest
import torch
from PIL import Image

from effllm_lib.serving import fair, loaded, profiler
from effllm_lib.serving import preprocess as pp
from effllm_lib.serving.experiments import GPU_OPTIMIZATIONS, add_server_args, server_overrides
from effllm_lib.serving.images import synthetic_jpeg
from effllm_lib.serving.server import ServerConfig, VisionAPI


def jpeg(seed, w=160, h=120):
    return synthetic_jpeg(w, h, seed=seed)


def pil_chw(data):
    """Independent reference decode: Pillow straight to a CHW uint8 tensor."""
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1).contiguous()


class FakeNvjpeg:
    """Decodes with Pillow; like nvJPEG, one image it cannot decode fails the whole call. ``refuse`` holds bytes
    it treats as undecodable (a JPEG libjpeg accepts may still be one nvJPEG refuses, e.g. CMYK)."""

    def __init__(self, refuse=()):
        self.refuse, self.calls = set(refuse), []

    def __call__(self, raws, device):
        self.calls.append(len(raws))
        out = []
        for raw in raws:
            data = bytes(raw.numpy())
            if data in self.refuse:
                raise RuntimeError("nvjpegDecodeBatched failed: NVJPEG_STATUS_BAD_JPEG")
            out.append(pil_chw(data).to(device))
        return out


def test_one_call_for_a_good_batch():
    datas = [jpeg(k) for k in range(4)]
    fake = FakeNvjpeg()
    out = pp.decode_batch_isolated(datas, fake, "cpu")
    assert fake.calls == [4]
    for d, x in zip(datas, out):
        assert torch.equal(x, pil_chw(d))


def test_a_bad_image_fails_alone_and_the_others_are_decoded():
    datas = [jpeg(k) for k in range(5)]
    fake = FakeNvjpeg(refuse={datas[2]})
    out = pp.decode_batch_isolated(datas, fake, "cpu")
    assert fake.calls == [5, 1, 1, 1, 1, 1]  # the batch, then each image alone
    assert isinstance(out[2], pp.BadImage) and out[2].status == 400 and "NVJPEG_STATUS_BAD_JPEG" in str(out[2])
    for k in (0, 1, 3, 4):
        assert torch.equal(out[k], pil_chw(datas[k]))


def test_a_decoder_that_returns_too_few_or_malformed_images_is_not_trusted():
    datas = [jpeg(k) for k in range(3)]

    def short(raws, device):  # drops the last image of a batch
        return [pil_chw(bytes(r.numpy())) for r in raws][: max(1, len(raws) - 1)]

    out = pp.decode_batch_isolated(datas, short, "cpu")
    assert all(torch.equal(x, pil_chw(d)) for x, d in zip(out, datas))

    def grey(raws, device):  # one channel: not what the model takes
        return [pil_chw(bytes(r.numpy()))[:1] for r in raws]

    out = pp.decode_batch_isolated(datas, grey, "cpu")
    assert all(isinstance(x, pp.BadImage) and "expected (3, H, W)" in str(x) for x in out)
    assert pp.decode_batch_isolated([], FakeNvjpeg(), "cpu") == []


def test_missing_torchvision_or_cuda_is_a_clear_error():
    try:
        import torchvision  # noqa: F401
        have_tv = True
    except Exception:  # noqa: BLE001
        have_tv = False
    what = "CUDA device" if have_tv else "torchvision"
    if have_tv and torch.cuda.is_available():
        pytest.skip("torchvision and CUDA are both here")
    with pytest.raises(RuntimeError, match=what) as exc:
        pp.nvjpeg_batch_decoder("cuda")
    assert str(exc.value).startswith(pp.NVJPEG_MISSING)
    # the per-request nvjpeg decoder says the same, instead of a 400 for every image
    with pytest.raises(RuntimeError, match=what):
        pp.decode(jpeg(0), "nvjpeg", device="cuda", strict=False)
    # and a server worker refuses to start
    api = VisionAPI("mobilenet_v2", pp.PreprocessConfig(decoder="nvjpeg", batch_decode=True), pretrained=False)
    with pytest.raises(RuntimeError, match=what):
        api.setup("cpu")


def test_option_checks():
    with pytest.raises(ValueError, match="nvjpeg"):
        pp.PreprocessConfig(decoder="pil", batch_decode=True)
    with pytest.raises(TypeError, match="batch_decode"):
        pp.PreprocessConfig(decoder="nvjpeg", batch_decode="yes")
    with pytest.raises(ValueError, match="cuda"):
        ServerConfig(decoder="nvjpeg", batch_decode=True)  # accelerator cpu
    with pytest.raises(ValueError, match="nvjpeg"):
        ServerConfig(decoder="turbo", batch_decode=True, accelerator="cuda")
    cfg = ServerConfig(decoder="nvjpeg", batch_decode=True, accelerator="cuda")
    assert cfg.preprocess_config().batch_decode is True
    assert ServerConfig(**{"accelerator": "cuda", **GPU_OPTIMIZATIONS["combined, batched GPU decode"]}).batch_decode


def test_command_line_option():
    ap = argparse.ArgumentParser()
    add_server_args(ap)
    args = ap.parse_args(["--accelerator", "cuda", "--decoder", "nvjpeg", "--batch-decode"])
    assert server_overrides(args) == {"accelerator": "cuda", "decoder": "nvjpeg", "batch_decode": True}
    assert server_overrides(ap.parse_args(["--decoder", "turbo"])) == {"decoder": "turbo"}
    for bad in (["--batch-decode"], ["--batch-decode", "--accelerator", "cuda"],
                ["--batch-decode", "--decoder", "nvjpeg"]):
        with pytest.raises(ValueError, match="--batch-decode"):
            server_overrides(ap.parse_args(bad))
    with pytest.raises(SystemExit):
        ap.parse_args(["--decoder", "libpng"])


def test_benchmarks_offer_the_batched_design_only_on_cuda():
    with pytest.raises(ValueError, match="CUDA"):
        loaded.run("ci", decoders=("nvjpeg, batched",))
    with pytest.raises(ValueError, match="unknown decoders"):
        loaded.run("ci", decoders=("nvjpeg batched",))
    name = "optimized: batched nvJPEG on the GPU"
    cfg = fair.design_config(name, batch=8, workers=2, threads=1, server={"accelerator": "cuda"})
    assert cfg.batch_decode and cfg.decoder == "nvjpeg" and cfg.max_batch_size == 8 and fair.ROLE[name] == "optimized"
    with pytest.raises(ValueError, match="cuda"):
        fair.design_config(name, batch=8, workers=2, threads=1)


@pytest.fixture(scope="module")
def api_and_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_decode")
    datas = [jpeg(k, 300, 200) for k in range(4)]
    reqs = []
    for k, d in enumerate(datas):
        p = tmp / f"{k}.jpg"
        p.write_bytes(d)
        reqs.append({"path": str(p), "content_type": "image/jpeg"})
    return datas, reqs


def make_api(normalize_on, fake):
    torch.manual_seed(0)
    api = VisionAPI("mobilenet_v2", pp.PreprocessConfig(decoder="nvjpeg", batch_decode=True, normalize_on=normalize_on),
                    pretrained=False, max_batch_size=8)
    api.batch_decoder = fake  # set before setup: no torchvision or CUDA needed
    api.setup("cpu")
    return api


@pytest.mark.parametrize("normalize_on", ["device", "host"])
def test_server_batch_with_a_bad_image_answers_the_good_ones(api_and_files, normalize_on):
    datas, reqs = api_and_files
    fake = FakeNvjpeg(refuse={datas[1]})
    api = make_api(normalize_on, fake)
    items = [api.decode_request(r) for r in reqs]
    assert all(it.error is None and it.x is None and it.jpeg is not None for it in items)  # nothing decoded yet
    out = api.predict(api.batch(items))
    assert fake.calls == [4, 1, 1, 1, 1]
    replies = [api.encode_response(it) for it in out]
    assert [getattr(r, "status_code", 200) for r in replies] == [200, 400, 200, 200]
    assert out[1].cause == "bad_image" and "nvJPEG" in out[1].error[1]
    assert all(it.batch_size == 3 for k, it in enumerate(out) if k != 1)
    # reference, independent of the server: Pillow decode, torch resize and normalize, the net on each image alone
    for k in (0, 2, 3):
        x = pp.normalize(pp.resize(pil_chw(datas[k]), api.spec.input_size), api.spec.mean, api.spec.std)
        with torch.inference_mode():
            ref = torch.softmax(api.net(x[None])[0], 0).topk(5)
        assert out[k].result["top5"] == ref.indices.tolist()
        assert out[k].result["prob"] == pytest.approx(ref.values.tolist(), abs=1e-4)
        # the stamps are in the profiler's order (decode and resize happen in the inference step)
        st = {**out[k].stamps, "sent": out[k].stamps["dequeued"], "received": out[k].stamps["dequeued"]}
        st["done"] = st["postprocessed"]
        assert all(v >= 0 for v in profiler.spans(st).values())


def test_header_checks_stay_per_request(api_and_files):
    """A file that is not a JPEG, or is truncated, is refused by its own request before the batch decode."""
    api = make_api("device", FakeNvjpeg())
    datas, reqs = api_and_files
    bad = dict(reqs[0])
    p = bad["path"] + ".trunc"
    open(p, "wb").write(datas[0][: len(datas[0]) // 2])
    bad["path"] = p
    item = api.decode_request(bad)
    assert item.error is not None and item.error[0] == 400 and item.jpeg is None
    out = api.predict(api.batch([item, api.decode_request(reqs[2])]))
    assert out[0].error[0] == 400 and out[1].error is None and out[1].batch_size == 1


def test_gpu_results_prefers_the_newest_machine(tmp_path, monkeypatch):
    import pandas as pd

    from effllm_lib import results
    from effllm_lib.serving.experiments import gpu_results

    monkeypatch.setenv("EFFLLM_DATA_DIR", str(tmp_path))
    assert gpu_results("optimizations") == (None, "", "")
    results.save(pd.DataFrame({"design": ["naive"], "speedup": [1.0]}), "serving", "optimizations_h100", scale="full")
    df, suffix, machine = gpu_results("optimizations")
    assert (suffix, machine) == ("_h100", "H100") and list(df.design) == ["naive"]
    results.save(pd.DataFrame({"design": ["combined"], "speedup": [2.0]}), "serving", "optimizations_h200", scale="full")
    df, suffix, machine = gpu_results("optimizations")
    assert (suffix, machine) == ("_h200", "H200") and list(df.design) == ["combined"]
    # a CI-scale H200 file never stands in for a committed result
    results.save(pd.DataFrame({"x": [1]}), "serving", "fair_h200", scale="ci")
    assert gpu_results("fair") == (None, "", "")
