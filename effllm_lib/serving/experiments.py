"""The chapter's measurements, as functions the notebooks and benchmarks call.

* ``breakdown``: one client at a time (no queueing), every stage of every request, per model and image size.
* ``throughput``: the same server fed JPEGs (full preprocessing) or pre-decoded pixels (none), closed loop
  at saturation and open loop over offered load.
* ``optimizations``: the naive design, each optimization alone, and all of them combined.
* ``routing``: a mixed small/large workload on one pool vs two pools, dealt round-robin or by image size.

The machine this runs on may be shared: every function repeats its measurement in rounds and the callers
take medians; ``machine_load()`` records the load average so a reader can judge the noise.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict

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
    # the pre-decoded pixels input exists for this comparison only: switched on here, off on a public server
    cfg = ServerConfig(model=model, **{**(server or {}), "allow_pixels": True})
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


def run_pipeline_suite(scale: str = "ci", *, save: bool = False, appendfsync: str = "always", tag: str = "",
                       device: str = "cpu") -> dict:
    """Detector -> classifier over each broker; per-crop spans, per-broker medians and the claim row.
    ``appendfsync`` is the Redis durability setting (``always``: an accepted crop survives a broker crash);
    ``device`` runs both DNNs there (``cuda`` on the GPU machine); ``tag`` suffixes the results names (claims
    are saved only untagged)."""
    from .. import results
    from . import broker as B

    if scale not in PIPELINE_SCALES:
        raise ValueError(f"scale must be one of {', '.join(PIPELINE_SCALES)}")
    p = {**PIPELINE_SCALES[scale], "appendfsync": appendfsync, "device": device}
    photos = _images.photos(p["size"])
    imgs = [photos[i % len(photos)][1] for i in range(p["images"])]
    load_before, frames = machine_load(), []
    import contextlib

    # redis-server only where a Redis broker is measured (a machine without it can still run the others)
    with (B.RedisServer(appendfsync=appendfsync) if "redis" in p["brokers"] else contextlib.nullcontext()) as rs:
        for r in range(p["rounds"]):
            for kind in p["brokers"]:
                df = B.pipeline_frame(B.run_pipeline(kind, imgs, crops=p["crops"], rate=p["rate"],
                                                     redis_url=rs.url if rs else None, device=device))
                df["round"] = r
                frames.append(df)
        aof_fs = B.filesystem_of(rs.workdir) if rs else None
    crops = pd.concat(frames, ignore_index=True)
    summary = B.broker_share(crops)
    if "redis" not in p["brokers"]:
        out = {"crops": crops, "summary": summary, "claims": pd.DataFrame()}
        if save:
            extra = {"load_before": load_before, "load_after": machine_load()}
            for name, key in (("pipeline_crops", "crops"), ("pipeline_summary", "summary")):
                results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
        return out
    redis_share = float(summary.set_index("broker").loc["redis", "broker_share"])
    claims = pd.DataFrame([{"claim_id": "broker_share_pipeline", "ours": round(redis_share, 2), "status": "measured",
                            "reason": f"Redis stream (acknowledged, exactly once by message id, appendfsync "
                                      f"{appendfsync}) between a MobileNetV2-SSDLite-like detector and a "
                                      f"MobileNetV2 classifier, {p['crops']} crops of 224x224 per {p['size']} photo, "
                                      f"median over crops, DNNs on {device.upper()}"}])
    out = {"crops": crops, "summary": summary, "claims": claims}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load(), "aof_filesystem": aof_fs}
        for name, key in (("pipeline_crops", "crops"), ("pipeline_summary", "summary"), ("claims_pipeline", "claims")):
            if not (tag and key == "claims"):
                results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out


DURABILITY_SCALES = {"ci": {"messages": 100, "rounds": 1}, "full": {"messages": 1000, "rounds": 5}}


def run_durability_suite(scale: str = "ci", *, save: bool = False, workdir: str | None = None, tag: str = "") -> dict:
    """Per-message cost of Redis's ``appendfsync`` settings (``broker.durability_cost``): ``runs`` (one row
    per setting and round) and ``summary`` (medians over rounds, and each setting's whole-message p50 as a
    ratio to ``no``, the setting without fsync)."""
    from .. import results
    from . import broker as B

    if scale not in DURABILITY_SCALES:
        raise ValueError(f"scale must be one of {', '.join(DURABILITY_SCALES)}")
    p = DURABILITY_SCALES[scale]
    load_before = machine_load()
    runs = pd.DataFrame(B.durability_cost(messages=p["messages"], rounds=p["rounds"], workdir=workdir))
    cols = [c for c in runs.columns if c.endswith("_us")]
    med = runs.groupby(["appendfsync", "filesystem"], sort=False)[cols].median().reset_index()
    base = float(med.set_index("appendfsync").loc["no", "message_p50_us"])
    med["message_p50_vs_no"] = med["message_p50_us"] / base
    med["extra_us_per_message"] = med["message_p50_us"] - base
    out = {"runs": runs, "summary": med}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load()}
        for name, key in (("durability_runs", "runs"), ("durability", "summary")):
            results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out


# ----------------------------------------------------------------------------------------- optimizations
NAIVE = {"decoder": "pil", "reduced": False, "normalize_on": "host", "max_batch_size": 1, "workers": 1,
         "pin_memory": False}
# "pinned host memory" stages each batch in page-locked memory before the host-to-device copy: it only
# changes a CUDA server (a CPU server makes no such copy, so on the CPU it measures the same as naive).
OPTIMIZATIONS = {
    "naive": {},
    "dynamic batching": {"max_batch_size": 8},
    "DCT-domain reduced decode": {"reduced": True},
    # libjpeg-turbo through simplejpeg reports libjpeg's warnings itself: strict decoding without the
    # separate entropy-decoding pass that Pillow needs (see preprocess)
    "simplejpeg decoder": {"decoder": "turbo"},
    "uint8 transfer, normalize after copy": {"normalize_on": "device"},
    "pinned host memory": {"pin_memory": True},
    "2 inference workers": {"workers": 2},
    # decoding in a pool of processes in the HTTP server, overlapped with the inference worker's batches
    # (otherwise the worker decodes every request of a batch itself before it can infer)
    "decode pool of 2, overlapped": {"decode_pool": 2},
    "combined": {"max_batch_size": 8, "reduced": True, "normalize_on": "device", "pin_memory": True, "workers": 2},
    "combined, 1 worker": {"max_batch_size": 8, "reduced": True, "normalize_on": "device", "pin_memory": True},
    "combined, 1 worker, decode pool of 2": {"max_batch_size": 8, "reduced": True, "normalize_on": "device",
                                             "pin_memory": True, "decode_pool": 2},
}
# On a CUDA server: the JPEG bytes go to the GPU and nvJPEG decodes and resizes there (torchvision.io), one
# request at a time in the worker, or (batched) the whole batch in one call, the pixels never on the host.
GPU_OPTIMIZATIONS = {
    "nvJPEG decode + resize on the GPU": {"decoder": "nvjpeg", "pin_memory": True},
    "combined, GPU decode": {"max_batch_size": 8, "decoder": "nvjpeg", "normalize_on": "device", "pin_memory": True,
                             "workers": 2},
    "combined, batched GPU decode": {"max_batch_size": 8, "decoder": "nvjpeg", "batch_decode": True,
                                     "normalize_on": "device", "pin_memory": True, "workers": 2},
}
OPT_SCALES = {
    "ci": {"configs": ("naive", "combined"), "size": "small", "per_size": 2, "concurrency": 8, "duration": 2.0,
           "passes": 1},
    "full": {"configs": tuple(OPTIMIZATIONS), "size": "medium", "per_size": 4, "concurrency": 8, "duration": 6.0,
             "passes": 5},
}


def _launch(stack, procs) -> None:
    """Start ``procs`` without waiting (they boot in parallel); ``stack`` stops each on exit, even if a
    later one fails to come up."""
    for proc in procs:
        if proc.proc is None:
            proc.launch()
            stack.callback(proc.stop)


def _start_paused(stack, procs, warmup_urls, imgs) -> None:
    """Boot ``procs`` (``stack`` stops them), wait until each is healthy, warm them up with a few requests
    through each of ``warmup_urls``, then SIGSTOP them until their turn."""
    _launch(stack, procs)
    for proc in procs:
        proc.start()  # already launched: waits until healthy
    for url in [warmup_urls] if isinstance(warmup_urls, str) else warmup_urls:
        loadgen.closed_loop(url, imgs, concurrency=2, requests=max(4, len(imgs)))
    for proc in procs:
        proc.pause()


def _interleaved_passes(designs: dict, imgs, *, passes: int, concurrency: int, duration: float,
                        summarize=loadgen.summarize) -> list[dict]:
    """``passes`` rounds in which each design (name -> (processes, URL)) is resumed, loaded with a closed loop
    for ``duration`` s, and paused again, so a slow phase of a shared machine is spread over all designs.
    One row per design and pass: ``summarize(records)``, the server CPU seconds and requests per CPU-second."""
    rows = []
    for r in range(passes):
        for name, (procs, url) in designs.items():
            for proc in procs:
                proc.resume()
            time.sleep(0.2)
            cpu0 = sum(proc.cpu_seconds() for proc in procs)
            recs = loadgen.closed_loop(url, imgs, concurrency=concurrency, duration=duration)
            cpu = sum(proc.cpu_seconds() for proc in procs) - cpu0
            for proc in procs:
                proc.pause()
            summ = summarize(recs)
            rows.append({"design": name, "pass": r, **summ, "server_cpu_s": cpu,
                         "requests_per_cpu_s": summ["ok"] / cpu if cpu > 0 else float("nan")})
    return rows


def run_optimizations_suite(scale: str = "ci", *, save: bool = False, log_path: str | None = None,
                            server: dict | None = None, tag: str = "", configs: tuple[str, ...] | None = None) -> dict:
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
    if configs:  # a subset of the designs (the first is the reference of the ratios)
        unknown = set(configs) - set(designs)
        if unknown:
            raise ValueError(f"unknown designs {sorted(unknown)}; expected some of {list(designs)}")
        p["configs"] = tuple(configs)
    imgs = _images.photos(p["size"], p["per_size"])
    load_before = machine_load()
    with contextlib.ExitStack() as stack:
        procs = {name: ServerProcess(ServerConfig(**{**NAIVE, **(server or {}), **designs[name]}), log_path=log_path)
                 for name in p["configs"]}
        if p.get("parallel_boot"):  # many cores: boot every server at once, then warm up and pause each in turn
            _launch(stack, procs.values())
        servers = {}
        for name, proc in procs.items():
            _start_paused(stack, [proc], proc.url, imgs)
            servers[name] = ([proc], proc.url)
        rows = _interleaved_passes(servers, imgs, passes=p["passes"], concurrency=p["concurrency"],
                                   duration=p["duration"])
    runs = pd.DataFrame(rows)
    med = runs.groupby("design", sort=False)[["throughput_rps", "p50_ms", "p99_ms", "mean_batch",
                                              "requests_per_cpu_s"]].median()
    ref = "naive" if "naive" in med.index else p["configs"][0]
    med["speedup"] = med["throughput_rps"] / med.loc[ref, "throughput_rps"]
    med["cpu_efficiency_gain"] = med["requests_per_cpu_s"] / med.loc[ref, "requests_per_cpu_s"]
    med = med.reset_index()
    gain = float(med.set_index("design").loc["combined", "speedup"]) if "combined" in set(med.design) else float("nan")
    claims = pd.DataFrame([{"claim_id": "optimized_throughput_gain", "ours": round(gain, 3), "status": "measured",
                            "reason": f"combined vs naive design of our server (Pillow full decode, no batching, "
                                      f"float transfer, pageable memory, 1 worker), MobileNetV2, {p['size']} photos, "
                                      f"{p['concurrency']} closed-loop clients, "
                                      f"{(server or {}).get('accelerator', 'cpu').upper()}; combined = batching + "
                                      f"reduced decode + uint8 transfer + pinned memory + 2 workers"}])
    out = {"runs": runs, "summary": med, "claims": claims}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load(), "naive": NAIVE,
                 "optimizations": {k: designs[k] for k in p["configs"]}, "server": server or {}}
        for name, key in (("optimizations_runs", "runs"), ("optimizations", "summary"),
                          ("claims_optimizations", "claims")):
            if not (tag and key == "claims"):
                results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out


# ---------------------------------------------------------------------------------------- size-aware routing
# The mixed workload: half small (1 MP), half large (15 MP) photos, in runs as long as the round-robin
# router's cycle (ci: small, small, large, large, ...), so that a round-robin gives each pool the same mix
# (strict alternation over two pools would send every small photo to the same pool: size routing by
# accident). The 4 MP class is left out so that "small" and "large" are far apart and the split is
# unambiguous (the router's threshold, 3 MP, lies between the classes).
# The pools of the routed designs: the combined design's settings in both, batching for the small pool (many
# cheap requests), none for the large one (decode-bound: a batch would make each wait for the others' decodes).
# ``workers`` splits the inference workers between the pools (the one-pool design gets their sum): a large
# photo costs several times a small one, so at full scale the large pool gets more of them. The round-robin
# router deals requests in proportion to each pool's workers (its backend listed once per worker).
ROUTING_POOLS = {"small": {"max_batch_size": 8}, "large": {"max_batch_size": 1}}
ROUTING_SCALES = {
    "ci": {"mix": ("small", "large"), "per_size": 1, "workers": {"small": 1, "large": 1}, "concurrency": 4,
           "duration": 3.0, "passes": 1, "threshold_pixels": 3_000_000},
    "full": {"mix": ("small", "large"), "per_size": 3, "workers": {"small": 1, "large": 3}, "concurrency": 16,
             "duration": 8.0, "passes": 5, "threshold_pixels": 3_000_000},
}
ROUTING_DESIGNS = ("one pool", "two pools, round-robin", "two pools, size-aware router")


def mixed_images(mix, per_size: int, run: int = 2) -> list[tuple[str, bytes]]:
    """Photos of the size classes in ``mix`` in runs of ``run`` per class (run 2: a0 a1 b0 b1 a2 a0 b2 b0 ...),
    labelled ``class:name``. Each class fills every position modulo ``run`` equally often, so a round-robin
    over ``run`` backends (or a divisor of it) deals each backend the same mix."""
    if run < 1:
        raise ValueError("run must be >= 1")
    groups = [_images.photos(s, per_size) for s in mix]
    n = min(len(g) for g in groups)
    return [g[(k * run + j) % n] for k in range(n) for g in groups for j in range(run)]


def summarize_by_size(records: list[dict], classes=("small", "large")) -> dict:
    """``loadgen.summarize`` over all requests, plus latency percentiles and throughput per size class
    (from the ``class:`` prefix of each record's image label; throughput over the run's whole wall time)."""
    out = loadgen.summarize(records)
    for c in classes:
        sub = [r for r in records if str(r["image"]).split(":", 1)[0] == c]
        if not sub:
            raise ValueError(f"no {c} requests among the records")
        s = loadgen.summarize(sub, wall=out["wall_s"])
        out.update({f"{c}_{k}": s[k] for k in ("ok", "errors", "throughput_rps", "p50_ms", "p99_ms")})
    return out


def run_routing_suite(scale: str = "ci", *, save: bool = False, log_path: str | None = None,
                      server: dict | None = None, tag: str = "") -> dict:
    """A mixed workload (``ROUTING_SCALES[scale]["mix"]``, alternating) in a closed loop, three designs of the
    same total inference workers (``workers``), each behind the same router hop:

    * ``one pool``: one server with the combined design's settings and all the workers;
    * ``two pools, round-robin``: a small-image pool and a large-image pool (``ROUTING_POOLS``, the workers
      split as ``workers`` says), requests dealt to them in turn (weighted by workers) whatever their size;
    * ``two pools, size-aware router``: the same two servers, small photos to the small pool, large to the
      large one, by the JPEG header (``router.RouterConfig.threshold_pixels``).

    Servers and routers boot first and are paused between turns; ``passes`` rounds measure the designs in turn
    (the same interleaving as ``run_optimizations_suite``). Returns ``runs`` (one row per design and pass:
    throughput, p50/p99 overall and per size class, server CPU) and ``summary`` (medians over passes)."""
    import contextlib

    from .. import results
    from .router import RouterConfig, RouterProcess

    if scale not in ROUTING_SCALES:
        raise ValueError(f"scale must be one of {', '.join(ROUTING_SCALES)}")
    p = dict(ROUTING_SCALES[scale])
    split = p["workers"]
    if set(split) != set(ROUTING_POOLS) or any(not isinstance(w, int) or w < 1 for w in split.values()):
        raise ValueError(f"workers must give each pool of {sorted(ROUTING_POOLS)} at least 1 worker, got {split}")
    base = {**NAIVE, **OPTIMIZATIONS["combined"], **(server or {})}
    cfgs = {"one pool": ServerConfig(**{**base, "workers": sum(split.values())}),
            **{k: ServerConfig(**{**base, **ROUTING_POOLS[k], "workers": split[k]}) for k in ROUTING_POOLS}}
    imgs = mixed_images(p["mix"], p["per_size"], run=sum(split.values()))  # the weighted round-robin's cycle
    load_before = machine_load()
    with contextlib.ExitStack() as stack:
        srv = {k: ServerProcess(c, log_path=log_path) for k, c in cfgs.items()}
        pools = {k: [srv[k].url] for k in ROUTING_POOLS}
        weighted = {k: [srv[k].url] * split[k] for k in ROUTING_POOLS}
        routers = {
            "one pool": RouterProcess(RouterConfig({"all": [srv["one pool"].url]}, policy="round_robin"),
                                      log_path=log_path),
            "two pools, round-robin": RouterProcess(RouterConfig(weighted, policy="round_robin"), log_path=log_path),
            "two pools, size-aware router": RouterProcess(
                RouterConfig(pools, policy="size", threshold_pixels=p["threshold_pixels"]), log_path=log_path)}
        members = {"one pool": [srv["one pool"]], "two pools, round-robin": [srv["small"], srv["large"]],
                   "two pools, size-aware router": [srv["small"], srv["large"]]}
        _launch(stack, list(srv.values()) + list(routers.values()))  # boot everything at once
        _start_paused(stack, [srv["one pool"], routers["one pool"]], routers["one pool"].url, imgs)
        two = ["two pools, round-robin", "two pools, size-aware router"]
        _start_paused(stack, [srv["small"], srv["large"]] + [routers[n] for n in two],
                      [routers[n].url for n in two], imgs)
        designs = {name: (members[name] + [routers[name]], routers[name].url) for name in ROUTING_DESIGNS}
        rows = _interleaved_passes(designs, imgs, passes=p["passes"], concurrency=p["concurrency"],
                                   duration=p["duration"],
                                   summarize=lambda recs: summarize_by_size(recs, p["mix"]))
    runs = pd.DataFrame(rows)
    cols = ["throughput_rps", "p50_ms", "p99_ms"] + [f"{c}_{k}" for c in p["mix"]
                                                     for k in ("throughput_rps", "p50_ms", "p99_ms")]
    med = runs.groupby("design", sort=False)[cols + ["mean_batch", "errors", "requests_per_cpu_s"]].median()
    ref = med.loc["one pool"]
    med["speedup"] = med["throughput_rps"] / ref["throughput_rps"]
    med["small_p50_ratio"] = med["small_p50_ms"] / ref["small_p50_ms"]
    med["small_p99_ratio"] = med["small_p99_ms"] / ref["small_p99_ms"]
    med = med.reset_index()
    out = {"runs": runs, "summary": med}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load(), "pools": ROUTING_POOLS,
                 "servers": {k: asdict(c) for k, c in cfgs.items()}, "server": server or {}}
        for name, key in (("routing_runs", "runs"), ("routing", "summary")):
            results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out


# the GPU machines the chapter's device runs were made on, newest first: results files carry the suffix
GPU_MACHINES = {"_h200": "H200", "_h100": "H100"}


def gpu_results(name: str, machines: dict[str, str] | None = None):
    """The committed full-scale results ``name + suffix`` of the newest GPU machine that has them (``GPU_MACHINES``
    order), as ``(frame, suffix, machine)``; ``(None, "", "")`` when no machine has them. Notebooks read the
    H200 run when it has been committed and fall back to the H100 one."""
    from .. import glue, results

    for suffix, machine in (machines or GPU_MACHINES).items():
        if results.results_path("serving", name + suffix).is_file():
            return glue.committed("serving", name + suffix), suffix, machine
    return None, "", ""


def add_server_args(ap) -> None:
    """The server options every serving benchmark takes: ``--accelerator``, ``--decoder``, ``--batch-decode``,
    ``--random-weights``, ``--lenient-jpeg``."""
    from .preprocess import DECODERS

    ap.add_argument("--accelerator", default=None, choices=("cpu", "cuda"))
    ap.add_argument("--decoder", default=None, choices=DECODERS,
                    help="JPEG decoder of the servers whose design does not set one (nvjpeg: on the GPU, CUDA only)")
    ap.add_argument("--batch-decode", action="store_true",
                    help="with --decoder nvjpeg: decode each batch in one nvJPEG call on the GPU (CUDA only)")
    ap.add_argument("--random-weights", action="store_true",
                    help="never look for checkpoints (timing does not depend on weights; for offline machines)")
    ap.add_argument("--lenient-jpeg", action="store_true",
                    help="accept JPEGs libjpeg only warns about (the paper's servers; default: strict, see preprocess)")


def server_overrides(args, **extra) -> dict | None:
    """The server settings those options ask for (plus any non-empty ``extra``), or None for the defaults.
    ``--batch-decode`` needs ``--accelerator cuda`` and ``--decoder nvjpeg`` (ValueError otherwise)."""
    server = {k: v for k, v in (("accelerator", args.accelerator), ("decoder", getattr(args, "decoder", None)),
                                *extra.items()) if v}
    if getattr(args, "batch_decode", False):
        if server.get("accelerator") != "cuda" or server.get("decoder") != "nvjpeg":
            raise ValueError("--batch-decode decodes on the GPU: it needs --accelerator cuda and --decoder nvjpeg")
        server["batch_decode"] = True
    if args.lenient_jpeg:
        server["strict_jpeg"] = False
    if args.random_weights:
        server["pretrained"] = False
    return server or None


def suite_main(run, scales: dict, argv=None, description: str | None = None) -> dict:
    """The command line the serving benchmarks share: ``--scale``, ``--accelerator`` (cpu or cuda), ``--tag``
    (suffix of the results files, e.g. ``_h100``) and ``--no-save``; runs ``run`` (a ``run_*_suite``) and
    prints its medians (and claims, where it has some)."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--scale", choices=sorted(scales), default="ci")
    add_server_args(ap)
    ap.add_argument("--tag", default="")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--configs", default=None,
                    help="';'-separated subset of the designs (names hold commas), the first the reference "
                         "(optimizations only), to split a long run into calls")
    args = ap.parse_args(argv)
    server = server_overrides(args)
    kw = {"configs": tuple(c.strip() for c in args.configs.split(";") if c.strip())} if args.configs else {}
    out = run(args.scale, save=not args.no_save, server=server, tag=args.tag, **kw)
    print(out["summary"].round(2).to_string())
    if "claims" in out:
        print(out["claims"].to_string())
    return out
