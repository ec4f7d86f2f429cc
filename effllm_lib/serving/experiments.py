"""The chapter's measurements, as functions the notebooks and benchmarks call.

* ``breakdown``: one client at a time (no queueing), every stage of every request, per model and image size.
* ``throughput``: the same server fed JPEGs (full preprocessing) or pre-decoded pixels (none), closed loop
  at saturation and open loop over offered load.
* ``optimizations``: the naive design, each optimization alone, and all of them combined.

The machine this runs on may be shared: every function repeats its measurement in rounds and the callers
take medians; ``machine_load()`` records the load average so a reader can judge the noise.
"""

from __future__ import annotations

import os
import time

import pandas as pd

from . import images as _images
from . import loadgen, profiler
from .models import TASKS
from .server import PIXELS_TYPE, ServerConfig, ServerProcess


def machine_load() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": round(one, 2), "loadavg_5m": round(five, 2), "cpus": os.cpu_count()}


def request_images(sizes, per_size: int) -> dict[str, list[tuple[str, bytes]]]:
    """The photographs for each size class."""
    return {s: _images.photos(s, per_size) for s in sizes}


def breakdown(models=("mobilenet_v2",), sizes=("small", "medium", "large"), *, per_size: int = 2, rounds: int = 3,
              requests: int = 4, server: dict | None = None, log_path: str | None = None) -> pd.DataFrame:
    """Per-request stage spans (ms): a closed loop of one client, ``rounds`` x ``requests`` per size, the
    sizes interleaved round by round so slow phases of a shared machine hit every size alike."""
    imgs = request_images(sizes, per_size)
    frames = []
    for model in models:
        if model not in TASKS:
            raise ValueError(f"unknown model {model!r}")
        cfg = ServerConfig(model=model, **(server or {}))
        with ServerProcess(cfg, log_path=log_path) as url:
            for s in sizes:  # warm-up: first touches of each size (allocator, caches)
                loadgen.closed_loop(url, imgs[s], requests=2)
            for r in range(rounds):
                for s in sizes:
                    recs = loadgen.closed_loop(url, imgs[s], concurrency=1, requests=requests)
                    bad = [x for x in recs if x["status"] != 200]
                    if bad:
                        raise RuntimeError(f"{len(bad)} requests failed: {bad[0].get('error')}")
                    df = profiler.frame(loadgen.ok_records(recs))
                    df["model"], df["task"], df["size"], df["round"] = model, TASKS[model][0], s, r
                    frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _bodies_for(imgs, mode: str, input_size):
    if mode == "jpeg":
        return imgs
    return [(label, _images.pixels_npy(data, input_size)) for label, data in imgs]


def _content_type(mode: str) -> str:
    if mode not in ("jpeg", "pixels"):
        raise ValueError(f"mode must be 'jpeg' (full preprocessing) or 'pixels' (none), got {mode!r}")
    return "image/jpeg" if mode == "jpeg" else PIXELS_TYPE


def throughput(model: str = "mobilenet_v2", size: str = "large", *, per_size: int = 2, concurrency: int = 8,
               duration: float = 8.0, rounds: int = 3, rates=(), rate_duration: float = 6.0,
               server: dict | None = None, log_path: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Throughput with preprocessing (JPEGs) and without (pre-decoded pixels) on one server.

    Returns (saturation, curve): ``saturation`` has one row per round and mode from a closed loop of
    ``concurrency`` clients; ``curve`` one row per offered rate and mode from a Poisson open loop."""
    imgs = request_images([size], per_size)[size]
    cfg = ServerConfig(model=model, **(server or {}))
    sat, curve = [], []
    with ServerProcess(cfg, log_path=log_path) as url:
        from .models import TASKS as _T

        bodies = {"jpeg": imgs, "pixels": _bodies_for(imgs, "pixels", _T[model][2])}
        for mode in bodies:
            loadgen.closed_loop(url, bodies[mode], concurrency=2, requests=4, content_type=_content_type(mode))
        for r in range(rounds):
            for mode in bodies:
                recs = loadgen.closed_loop(url, bodies[mode], concurrency=concurrency, duration=duration,
                                           content_type=_content_type(mode))
                sat.append({"model": model, "size": size, "mode": mode, "round": r, "concurrency": concurrency,
                            **loadgen.summarize(recs)})
        for rate in rates:
            for mode in bodies:
                recs = loadgen.open_loop(url, bodies[mode], rate=rate, duration=rate_duration,
                                         content_type=_content_type(mode))
                curve.append({"model": model, "size": size, "mode": mode, "offered_rps": rate,
                              **loadgen.summarize(recs)})
    return pd.DataFrame(sat), pd.DataFrame(curve)


def throughput_impact(sat: pd.DataFrame) -> float:
    """% of the no-preprocessing throughput lost when the server also preprocesses (medians of rounds)."""
    med = sat.groupby("mode")["throughput_rps"].median()
    return 100.0 * (1.0 - med["jpeg"] / med["pixels"])


# ------------------------------------------------------------------------------------------ suites
SCALES = {
    "ci": {"models": ("mobilenet_v2",), "per_size": 1, "rounds": 1, "requests": 2,
           "tp_sizes": ("large",), "tp_duration": 3.0, "tp_rounds": 1, "rates": (), "rate_duration": 2.0},
    "full": {"models": ("mobilenet_v2", "efficientnet_lite0", "resnet50", "segmentation", "detection", "depth"),
             "per_size": 2, "rounds": 3, "requests": 4,
             "tp_sizes": ("medium", "large"), "tp_duration": 10.0, "tp_rounds": 3, "rates": (0.5, 1, 2, 4),
             "rate_duration": 8.0},
}
SIZES = ("small", "medium", "large")


def claims_from(bd: pd.DataFrame, sat: pd.DataFrame) -> pd.DataFrame:
    """The scorecard rows this chapter's breakdown measures (MobileNetV2 classification)."""
    if "mobilenet_v2" not in set(bd.model) or not {"medium", "large"} <= set(bd["size"]) or \
            "large" not in set(sat["size"]):
        return pd.DataFrame()
    agg = profiler.breakdown(bd[bd.model == "mobilenet_v2"], by=["size"]).set_index("size")
    rows = []
    for claim, size in (("preproc_share_medium", "medium"), ("preproc_share_large", "large")):
        rows.append({"claim_id": claim, "ours": round(float(agg.loc[size, "preprocess_share"]), 2),
                     "status": "measured", "reason": f"MobileNetV2, one client, {size} photos "
                     f"({'x'.join(map(str, _images.SIZE_CLASSES[size]))}), median of stage medians, CPU"})
    large = sat[sat["size"] == "large"]
    rows.append({"claim_id": "throughput_impact_large", "ours": round(throughput_impact(large), 2),
                 "status": "measured", "reason": "MobileNetV2, 8 closed-loop clients, JPEGs vs pre-decoded "
                 "pixels, 5120x2880 photos, CPU"})
    return pd.DataFrame(rows)


def run_breakdown_suite(scale: str = "ci", *, save: bool = False, log_path: str | None = None,
                        server: dict | None = None, tag: str = "", models: tuple[str, ...] | None = None) -> dict:
    """Breakdown + throughput at ``scale`` (``models`` overrides the scale's model list); with ``save`` writes the results files (the full scale ones
    are committed and shown in the book). ``server`` overrides ``ServerConfig`` fields (e.g.
    ``{"accelerator": "cuda", "decoder": "nvjpeg"}`` on the device machine); ``tag`` suffixes the results
    names (e.g. ``"_h100"``) so a GPU run never overwrites the CPU one. Claims are saved only untagged."""
    from .. import results

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}")
    p = dict(SCALES[scale])
    if models:
        p["models"] = tuple(models)
    load_before = machine_load()
    t0 = time.time()
    bd = breakdown(p["models"], SIZES, per_size=p["per_size"], rounds=p["rounds"], requests=p["requests"],
                   log_path=log_path, server=server)
    sats, curves = [], []
    for size in p["tp_sizes"]:
        sat, curve = throughput("mobilenet_v2", size, per_size=p["per_size"], duration=p["tp_duration"],
                                rounds=p["tp_rounds"], rates=p["rates"], rate_duration=p["rate_duration"],
                                log_path=log_path, server=server)
        sats.append(sat)
        curves.append(curve)
    sat = pd.concat(sats, ignore_index=True)
    curve = pd.concat(curves, ignore_index=True) if any(len(c) for c in curves) else pd.DataFrame()
    out = {"requests": bd, "breakdown": profiler.breakdown(bd, by=["model", "task", "size"]),
           "saturation": sat, "curve": curve, "claims": claims_from(bd, sat)}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load(), "minutes": round((time.time() - t0) / 60, 1),
                 "server": {**ServerConfig().__dict__, **(server or {})}}
        for name, key in (("breakdown_requests", "requests"), ("breakdown", "breakdown"),
                          ("throughput_saturation", "saturation"), ("throughput_curve", "curve"),
                          ("claims_breakdown", "claims")):
            if len(out[key]) and not (tag and key == "claims"):
                results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out


# ------------------------------------------------------------------------------------- broker pipelines
PIPELINE_SCALES = {
    "ci": {"brokers": ("queue", "redis"), "size": "small", "images": 2, "crops": 2, "rate": 2.0, "rounds": 1},
    "full": {"brokers": ("queue", "shm", "redis"), "size": "medium", "images": 12, "crops": 4, "rate": 1.0,
             "rounds": 2},
}


def run_pipeline_suite(scale: str = "ci", *, save: bool = False) -> dict:
    """Detector -> classifier over each broker; per-crop spans, per-broker medians and the claim row."""
    from .. import results
    from . import broker as B

    if scale not in PIPELINE_SCALES:
        raise ValueError(f"scale must be one of {', '.join(PIPELINE_SCALES)}")
    p = PIPELINE_SCALES[scale]
    photos = _images.photos(p["size"])
    imgs = [photos[i % len(photos)][1] for i in range(p["images"])]
    load_before, frames = machine_load(), []
    with B.RedisServer() as rs:
        for r in range(p["rounds"]):
            for kind in p["brokers"]:
                df = B.pipeline_frame(B.run_pipeline(kind, imgs, crops=p["crops"], rate=p["rate"], redis_url=rs.url))
                df["round"] = r
                frames.append(df)
    crops = pd.concat(frames, ignore_index=True)
    summary = B.broker_share(crops)
    redis_share = float(summary.set_index("broker").loc["redis", "broker_share"])
    claims = pd.DataFrame([{"claim_id": "broker_share_pipeline", "ours": round(redis_share, 2), "status": "measured",
                            "reason": f"Redis stream (acknowledged) between a MobileNetV2-SSDLite-like detector and a "
                                      f"MobileNetV2 classifier, {p['crops']} crops of 224x224 per {p['size']} photo, "
                                      f"median over crops, CPU"}])
    out = {"crops": crops, "summary": summary, "claims": claims}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load()}
        for name, key in (("pipeline_crops", "crops"), ("pipeline_summary", "summary"), ("claims_pipeline", "claims")):
            results.save(out[key], "serving", name, params=p, scale=scale, extra=extra)
    return out


# ----------------------------------------------------------------------------------------- optimizations
NAIVE = {"decoder": "pil", "reduced": False, "normalize_on": "host", "max_batch_size": 1, "workers": 1}
OPTIMIZATIONS = {
    "naive": {},
    "dynamic batching": {"max_batch_size": 8},
    "DCT-domain reduced decode": {"reduced": True},
    "uint8 transfer, normalize after copy": {"normalize_on": "device"},
    "2 inference workers": {"workers": 2},
    "combined": {"max_batch_size": 8, "reduced": True, "normalize_on": "device", "workers": 2},
    "combined, 1 worker": {"max_batch_size": 8, "reduced": True, "normalize_on": "device"},
}
# On a CUDA server: the JPEG bytes go to the GPU and nvJPEG decodes and resizes there (torchvision.io).
GPU_OPTIMIZATIONS = {
    "nvJPEG decode + resize on the GPU": {"decoder": "nvjpeg"},
    "combined, GPU decode": {"max_batch_size": 8, "decoder": "nvjpeg", "normalize_on": "device", "workers": 2},
}
OPT_SCALES = {
    "ci": {"configs": ("naive", "combined"), "size": "small", "per_size": 2, "concurrency": 8, "duration": 2.0,
           "passes": 1},
    "full": {"configs": tuple(OPTIMIZATIONS), "size": "medium", "per_size": 4, "concurrency": 8, "duration": 6.0,
             "passes": 5},
}


def run_optimizations_suite(scale: str = "ci", *, save: bool = False, log_path: str | None = None,
                            server: dict | None = None, tag: str = "") -> dict:
    """Closed-loop throughput of the naive design, each optimization alone and all combined.

    All servers start first and stay up, paused (SIGSTOP) while it is not their turn; then ``passes``
    rounds measure each design in turn for ``duration`` seconds, so a slow phase of a shared machine is
    spread over all designs.
    Besides wall-clock throughput, each run records the CPU time the server's processes used, and
    ``requests_per_cpu_s`` (successful requests per server CPU-second) is a cost measure that other jobs on
    the machine disturb much less."""
    import contextlib

    from .. import results

    if scale not in OPT_SCALES:
        raise ValueError(f"scale must be one of {', '.join(OPT_SCALES)}")
    p = dict(OPT_SCALES[scale])
    designs = dict(OPTIMIZATIONS)
    if (server or {}).get("accelerator") == "cuda":
        designs.update(GPU_OPTIMIZATIONS)
        p["configs"] = tuple(p["configs"]) + tuple(GPU_OPTIMIZATIONS)
    imgs = _images.photos(p["size"], p["per_size"])
    load_before, rows = machine_load(), []
    with contextlib.ExitStack() as stack:
        servers = {}
        for name in p["configs"]:
            proc = ServerProcess(ServerConfig(**{**NAIVE, **(server or {}), **designs[name]}), log_path=log_path)
            stack.enter_context(proc)
            loadgen.closed_loop(proc.url, imgs, concurrency=2, requests=4)
            proc.pause()
            servers[name] = proc
        for r in range(p["passes"]):
            for name, proc in servers.items():
                proc.resume()
                time.sleep(0.2)
                cpu0 = proc.cpu_seconds()
                recs = loadgen.closed_loop(proc.url, imgs, concurrency=p["concurrency"], duration=p["duration"])
                cpu = proc.cpu_seconds() - cpu0
                proc.pause()
                summ = loadgen.summarize(recs)
                rows.append({"design": name, "pass": r, **summ, "server_cpu_s": cpu,
                             "requests_per_cpu_s": summ["ok"] / cpu if cpu > 0 else float("nan")})
    runs = pd.DataFrame(rows)
    med = runs.groupby("design", sort=False)[["throughput_rps", "p50_ms", "p99_ms", "mean_batch",
                                              "requests_per_cpu_s"]].median()
    med["speedup"] = med["throughput_rps"] / med.loc["naive", "throughput_rps"]
    med["cpu_efficiency_gain"] = med["requests_per_cpu_s"] / med.loc["naive", "requests_per_cpu_s"]
    med = med.reset_index()
    gain = float(med.set_index("design").loc["combined", "speedup"])
    claims = pd.DataFrame([{"claim_id": "optimized_throughput_gain", "ours": round(gain, 3), "status": "measured",
                            "reason": f"combined vs naive design of our server (Pillow full decode, no batching, "
                                      f"float transfer, 1 worker), MobileNetV2, {p['size']} photos, "
                                      f"{p['concurrency']} closed-loop clients, CPU; combined = batching + reduced "
                                      f"decode + uint8 transfer + 2 workers"}])
    out = {"runs": runs, "summary": med, "claims": claims}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load(), "naive": NAIVE,
                 "optimizations": {k: designs[k] for k in p["configs"]}, "server": server or {}}
        for name, key in (("optimizations_runs", "runs"), ("optimizations", "summary"),
                          ("claims_optimizations", "claims")):
            if not (tag and key == "claims"):
                results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out
