"""The per-stage breakdown under load: a batching server at saturation, every stage of every request.

``experiments.breakdown`` sends one request at a time (no queueing, batches of one): it shows what each stage
costs, not where a request's time goes when the server is busy. Here ``concurrency`` closed-loop clients keep a
dynamic-batching server (``batch``, ``workers``) saturated for ``duration`` seconds per (decoder, image size),
and each request's stamps give its spans (``profiler.STAGES``): under load ``queue`` (waiting for a worker and
for the requests ahead of it in the batch to be preprocessed) and ``batch_wait`` grow, and the preprocessing
share of the stage medians says how much of the busy server's time goes to data processing and movement.
On a CUDA server the decoders include ``nvjpeg`` (decode and resize on the GPU, request by request in the
worker) and ``nvjpeg, batched`` (the whole batch in one nvJPEG call, ``ServerConfig.batch_decode``).
"""

from __future__ import annotations

import contextlib
import time

import pandas as pd

from . import images as _images
from . import loadgen, profiler
from .experiments import machine_load
from .server import ServerConfig, ServerProcess

# decoder label -> the server settings it stands for
DECODE_DESIGNS = {"pil": {"decoder": "pil"}, "opencv": {"decoder": "opencv"}, "turbo": {"decoder": "turbo"},
                  "nvjpeg": {"decoder": "nvjpeg"}, "nvjpeg, batched": {"decoder": "nvjpeg", "batch_decode": True}}
GPU_DECODERS = ("nvjpeg", "nvjpeg, batched")

SCALES = {
    "ci": {"decoders": ("pil",), "sizes": ("small",), "per_size": 2, "batch": 8, "workers": 1, "concurrency": 8,
           "duration": 2.0, "passes": 1},
    "full": {"decoders": ("pil", "turbo"), "sizes": ("medium", "large"), "per_size": 4, "batch": 8, "workers": 2,
             "concurrency": 16, "duration": 6.0, "passes": 3},
}


def run(scale: str = "ci", *, save: bool = False, server: dict | None = None, tag: str = "",
        decoders: tuple[str, ...] | None = None, log_path: str | None = None) -> dict:
    """Per-request spans under load (``requests``), stage medians per decoder and size (``breakdown``) and the
    throughput of each pass (``throughput``); with ``save`` writes ``breakdown_loaded{_requests,_throughput,}<tag>``.
    One server per decoder, booted first and paused while the others are measured; sizes and decoders
    interleave pass by pass."""
    from .. import results

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}")
    p = dict(SCALES[scale])
    cuda = (server or {}).get("accelerator") == "cuda"
    p["decoders"] = tuple(decoders or (p["decoders"] + (GPU_DECODERS if cuda else ())))
    unknown = [d for d in p["decoders"] if d not in DECODE_DESIGNS]
    if unknown:
        raise ValueError(f"unknown decoders {unknown}; expected some of {list(DECODE_DESIGNS)}")
    if set(p["decoders"]) & set(GPU_DECODERS) and not cuda:
        raise ValueError("the nvjpeg decoders need a CUDA server (accelerator='cuda')")
    imgs = {s: _images.photos(s, p["per_size"]) for s in p["sizes"]}
    base = {k: v for k, v in (server or {}).items() if k not in ("decoder", "batch_decode")}
    cfgs = {d: ServerConfig(**{**base, **DECODE_DESIGNS[d], "max_batch_size": p["batch"], "workers": p["workers"]})
            for d in p["decoders"]}
    load_before, t0, frames, tput = machine_load(), time.time(), [], []
    with contextlib.ExitStack() as stack:
        procs = {d: ServerProcess(c, log_path=log_path) for d, c in cfgs.items()}
        for proc in procs.values():
            proc.launch()
            stack.callback(proc.stop)
        for d, proc in procs.items():
            proc.start()
            for s in p["sizes"]:
                loadgen.closed_loop(proc.url, imgs[s], concurrency=2, requests=4)
            proc.pause()
        for r in range(p["passes"]):
            for s in p["sizes"]:
                for d, proc in procs.items():
                    proc.resume()
                    time.sleep(0.2)
                    recs = loadgen.closed_loop(proc.url, imgs[s], concurrency=p["concurrency"], duration=p["duration"])
                    proc.pause()
                    summ = loadgen.summarize(recs)
                    tput.append({"decoder": d, "size": s, "pass": r, **summ})
                    df = profiler.frame(loadgen.ok_records(recs))
                    df["decoder"], df["size"], df["pass"] = d, s, r
                    frames.append(df)
    requests = pd.concat(frames, ignore_index=True)
    bd = profiler.breakdown(requests, by=["decoder", "size"])
    thr = pd.DataFrame(tput)
    bd = bd.merge(thr.groupby(["decoder", "size"])[["throughput_rps", "mean_batch"]].median().reset_index(),
                  on=["decoder", "size"])
    out = {"requests": requests, "breakdown": bd, "throughput": thr}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load(), "minutes": round((time.time() - t0) / 60, 1),
                 "servers": {d: c.__dict__ for d, c in cfgs.items()}}
        for name, key in (("breakdown_loaded_requests", "requests"), ("breakdown_loaded_throughput", "throughput"),
                          ("breakdown_loaded", "breakdown")):
            results.save(out[key], "serving", name + tag, params=p, scale=scale, extra=extra)
    return out
