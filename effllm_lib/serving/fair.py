"""The fair version of the paper's 2.25x: the optimized design against a baseline a reader would accept as
prior work, at equal cores and equal inference workers.

The chapter's first comparison (``experiments.run_optimizations_suite``) measured the combined design
against a *naive* server (one request at a time, one worker): that is not prior work, a throughput-oriented
server batches. Here the baselines are throughput-optimized servers as prior work builds them (NVIDIA Triton
or TorchServe with dynamic batching and the usual preprocessing: full JPEG decode, resize, float
normalization on the host):

* ``prior work: batching, Pillow``: dynamic batching (``batch``), ``workers`` inference workers, Pillow full
  decode, float normalize on the host, pageable memory;
* ``prior work: batching, libjpeg-turbo``: the same with the faster libjpeg-turbo binding (simplejpeg) and
  pinned memory, the strongest CPU-decoding baseline we can build;
* on a CUDA server also ``prior work: batching, nvJPEG``: the JPEG decoded and resized on the GPU, request by
  request (what NVIDIA DALI does for Triton).

The optimized designs use the same batching and the same inference workers:

* ``optimized: combined``: DCT-domain reduced decode, uint8 transfer with normalization after the copy,
  pinned memory (``experiments.OPTIMIZATIONS["combined"]``);
* ``optimized: combined, libjpeg-turbo``: the same through simplejpeg, whose reduced decode is strict at no
  extra cost (Pillow's needs a separate entropy-decoding pass, ``preprocess.check_scan``), so the comparison with
  the libjpeg-turbo baseline differs only in the optimizations;
* ``optimized: combined + decode pool``: the same, with decoding in a pool of ``workers`` processes in the
  HTTP server, overlapped with inference;
* on a CUDA server also ``optimized: batched nvJPEG on the GPU``: each batch decoded in one nvJPEG call, resized
  and normalized on the GPU (``ServerConfig.batch_decode``), the pixels never on the host.

Two references place them: ``naive`` (the old comparison's baseline: no batching, one worker) and
``ceiling: pre-decoded pixels`` (the batching server fed pixels the client already decoded and resized: what
any preprocessing optimization can at most reach on these cores, the physical limit of this comparison).

Equal resources: every server (the HTTP process, its decode pool and its inference workers) is confined to the
same CPU set (``server_cpus``, by ``sched_setaffinity`` before exec, inherited by every child), each worker runs
``threads`` torch threads, and the load generator can be kept off those cores (``client_cpus``). All servers boot
first and are paused (SIGSTOP) while not measured; ``passes`` rounds measure each design in turn (a slow phase
of a shared machine hits all of them). Ratios are against the *best* baseline (highest median throughput) of the
same run: the ratio of medians, and the median, min and max of the per-pass ratios (each design against the
best baseline in the same pass).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import pandas as pd

from . import images as _images
from . import loadgen
from .experiments import NAIVE, OPTIMIZATIONS, _launch, machine_load
from .server import PIXELS_TYPE, ServerConfig, ServerProcess

BASELINES = {
    "prior work: batching, Pillow": {"decoder": "pil", "normalize_on": "host", "pin_memory": False},
    "prior work: batching, libjpeg-turbo": {"decoder": "turbo", "normalize_on": "host", "pin_memory": True},
}
GPU_BASELINES = {"prior work: batching, nvJPEG": {"decoder": "nvjpeg", "normalize_on": "device", "pin_memory": True}}
# on a CUDA server: the batch decoded in one nvJPEG call, resized and normalized on the GPU (ServerConfig.batch_decode)
GPU_OPTIMIZED = {"optimized: batched nvJPEG on the GPU": {"decoder": "nvjpeg", "batch_decode": True,
                                                          "normalize_on": "device", "pin_memory": True}}
_COMBINED = {k: v for k, v in OPTIMIZATIONS["combined"].items() if k not in ("workers", "max_batch_size")}
OPTIMIZED = {
    "optimized: combined": dict(_COMBINED),
    # the same with libjpeg-turbo's own API: its reduced decode is strict for free (Pillow needs a separate
    # entropy-decoding pass to see libjpeg's warnings, see preprocess), as the libjpeg-turbo baseline's is
    "optimized: combined, libjpeg-turbo": {**_COMBINED, "decoder": "turbo"},
    "optimized: combined + decode pool": {**_COMBINED, "decode_pool": None},  # None: as many as workers
}
REFERENCES = {
    "naive": {"max_batch_size": 1, "workers": 1},
    "ceiling: pre-decoded pixels": {"decoder": "pil", "normalize_on": "device", "pin_memory": True,
                                    "allow_pixels": True},
}
ROLE = {**{k: "baseline" for k in (*BASELINES, *GPU_BASELINES)}, **{k: "optimized" for k in (*OPTIMIZED, *GPU_OPTIMIZED)},
        **{k: "reference" for k in REFERENCES}}

SCALES = {
    "ci": {"designs": ("prior work: batching, Pillow", "optimized: combined"), "size": "small", "per_size": 2,
           "batch": 8, "workers": 1, "threads": 1, "concurrency": 8, "duration": 2.0, "passes": 1},
    "full": {"designs": (*BASELINES, *OPTIMIZED, *REFERENCES), "size": "medium", "per_size": 4, "batch": 8,
             "workers": 2, "threads": 1, "concurrency": 16, "duration": 6.0, "passes": 5},
}

# sched_setaffinity, then exec the server: its HTTP process, decode pool and workers inherit the CPU set
_AFFINITY_EXEC = ("import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
                  "os.execv(sys.argv[2], sys.argv[2:])")


def parse_cpus(text: str | None) -> tuple[int, ...] | None:
    """'0-3,8' -> (0, 1, 2, 3, 8); None or '' -> None (no pinning)."""
    if not text:
        return None
    cpus = set()
    for part in str(text).split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"bad CPU list {text!r}; expected e.g. '0-3,8'")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    missing = cpus - os.sched_getaffinity(0)
    if missing:
        raise ValueError(f"CPUs {sorted(missing)} are not available here (have {sorted(os.sched_getaffinity(0))})")
    return tuple(sorted(cpus))


def pinned_command(cmd: list[str], cpus: tuple[int, ...] | None) -> list[str]:
    """``cmd`` run on ``cpus`` only (unchanged when ``cpus`` is None)."""
    if not cpus:
        return list(cmd)
    return [sys.executable, "-c", _AFFINITY_EXEC, ",".join(map(str, cpus)), *cmd]


class PinnedServerProcess(ServerProcess):
    """A ``ServerProcess`` whose whole process tree runs on ``cpus``."""

    def __init__(self, cfg: ServerConfig, *, cpus: tuple[int, ...] | None = None, log_path: str | None = None):
        super().__init__(cfg, log_path=log_path)
        self.cpus = cpus

    def command(self) -> list[str]:
        return pinned_command(super().command(), self.cpus)


def design_config(name: str, *, batch: int, workers: int, threads: int, server: dict | None = None) -> ServerConfig:
    """The ``ServerConfig`` of a design at the run's batch size, workers and threads (``server`` overrides
    fields, e.g. the accelerator, but never the design's own settings)."""
    spec = {**BASELINES, **GPU_BASELINES, **OPTIMIZED, **GPU_OPTIMIZED, **REFERENCES}
    if name not in spec:
        raise ValueError(f"unknown design {name!r}; expected one of {list(spec)}")
    # the run's settings (accelerator, weights) first: the design's own (NAIVE's keys) always win
    fields = {**(server or {}), **NAIVE, "max_batch_size": batch, "workers": workers, "threads": threads,
              **spec[name]}
    if fields.get("decode_pool", 0) is None:
        fields["decode_pool"] = workers
    return ServerConfig(**fields)


def ratios(runs: pd.DataFrame) -> pd.DataFrame:
    """Medians over passes per design, and each design's throughput against the best baseline of the run:
    ``ratio_of_medians`` and the median / min / max of the per-pass ratios (against that baseline's throughput
    in the same pass). ``of_ceiling`` is the fraction of the pre-decoded pixels ceiling, where it was measured."""
    need = {"design", "role", "pass", "throughput_rps"}
    if not need <= set(runs.columns):
        raise ValueError(f"runs needs the columns {sorted(need)}")
    med = runs.groupby(["design", "role"], sort=False)[
        ["throughput_rps", "p50_ms", "p99_ms", "mean_batch", "requests_per_cpu_s", "errors"]].median().reset_index()
    base = med[med.role == "baseline"]
    if base.empty:
        raise ValueError("no baseline design among the runs")
    best = base.loc[base.throughput_rps.idxmax(), "design"]
    per_pass = runs.pivot_table(index="pass", columns="design", values="throughput_rps")
    rel = per_pass.div(per_pass[best], axis=0)
    med["best_baseline"] = best
    med["ratio_of_medians"] = med.throughput_rps / float(med.set_index("design").loc[best, "throughput_rps"])
    med["ratio_median"] = med.design.map(rel.median())
    med["ratio_min"] = med.design.map(rel.min())
    med["ratio_max"] = med.design.map(rel.max())
    ceiling = med.set_index("design").throughput_rps.get("ceiling: pre-decoded pixels")
    med["of_ceiling"] = med.throughput_rps / ceiling if ceiling else float("nan")
    med["passes"] = med.design.map(runs.groupby("design").size())
    return med


CLAIM = "optimized_gain_vs_prior_work"


def claims_from(summary: pd.DataFrame, where: str) -> pd.DataFrame:
    """The scorecard row: the fastest optimized design's throughput over the best baseline (ratio of medians),
    the per-pass range and both designs named in the reason."""
    opt = summary[summary.role == "optimized"]
    if opt.empty:
        return pd.DataFrame()
    best = opt.loc[opt.throughput_rps.idxmax()]
    return pd.DataFrame([{"claim_id": CLAIM, "ours": round(float(best.ratio_of_medians), 3), "status": "measured",
                          "reason": f"{best.design} vs {best.best_baseline} (the faster baseline), same batching, "
                                    f"inference workers and CPU set; per-pass ratios {best.ratio_min:.2f} to "
                                    f"{best.ratio_max:.2f} over {int(best.passes)} passes; MobileNetV2, {where}"}])


def run(scale: str = "ci", *, save: bool = False, claims: bool = False, server: dict | None = None, tag: str = "",
        server_cpus: str | None = None, client_cpus: str | None = None, workers: int | None = None,
        designs: tuple[str, ...] | None = None, log_path: str | None = None) -> dict:
    """Closed-loop throughput of every design at ``scale``, interleaved in passes; returns ``runs`` (one row per
    design and pass), ``summary`` (``ratios``) and ``claims``; with ``save`` writes ``fair_runs<tag>`` and
    ``fair<tag>``, and with ``claims`` also ``claims_fair`` (the scorecard's row: one run only, never tagged)."""
    from .. import results

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}")
    p = dict(SCALES[scale])
    if workers is not None:
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        p["workers"] = workers
    names = list(designs or p["designs"])
    if (server or {}).get("accelerator") == "cuda" and not designs:
        names[len(BASELINES):len(BASELINES)] = list(GPU_BASELINES)
        at = len(BASELINES) + len(GPU_BASELINES) + len([n for n in names if n in OPTIMIZED])
        names[at:at] = list(GPU_OPTIMIZED)
    p["designs"] = tuple(names)
    scpus, ccpus = parse_cpus(server_cpus), parse_cpus(client_cpus)
    p.update(server_cpus=list(scpus) if scpus else "all", client_cpus=list(ccpus) if ccpus else "all")
    cfgs = {n: design_config(n, batch=p["batch"], workers=p["workers"], threads=p["threads"], server=server)
            for n in names}
    imgs = _images.photos(p["size"], p["per_size"])
    from .models import TASKS

    pixels = [(label, _images.pixels_npy(data, TASKS[cfgs[names[0]].model][2])) for label, data in imgs]
    bodies = {n: ((pixels, PIXELS_TYPE) if cfgs[n].allow_pixels else (imgs, "image/jpeg")) for n in names}
    load_before, t0, rows = machine_load(), time.time(), []
    with contextlib.ExitStack() as stack:
        if ccpus:  # the load generator's threads (this process) off the servers' cores, restored at the end
            stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
            os.sched_setaffinity(0, ccpus)
        procs = {n: PinnedServerProcess(cfgs[n], cpus=scpus, log_path=log_path) for n in names}
        _launch(stack, procs.values())  # boot in parallel
        for n, proc in procs.items():
            proc.start()
            body, ctype = bodies[n]
            loadgen.closed_loop(proc.url, body, concurrency=2, requests=max(4, len(body)), content_type=ctype)
            proc.pause()
        for r in range(p["passes"]):
            for n, proc in procs.items():
                proc.resume()
                time.sleep(0.2)
                cpu0 = proc.cpu_seconds()
                body, ctype = bodies[n]
                recs = loadgen.closed_loop(proc.url, body, concurrency=p["concurrency"], duration=p["duration"],
                                           content_type=ctype)
                cpu = proc.cpu_seconds() - cpu0
                proc.pause()
                s = loadgen.summarize(recs)
                rows.append({"design": n, "role": ROLE[n], "pass": r, **s, "server_cpu_s": cpu,
                             "requests_per_cpu_s": s["ok"] / cpu if cpu > 0 else float("nan")})
    runs = pd.DataFrame(rows)
    summary = ratios(runs)
    acc = (server or {}).get("accelerator", "cpu").upper()
    where = (f"{p['size']} photos, {p['concurrency']} closed-loop clients, batch {p['batch']}, "
             f"{p['workers']} workers, {len(scpus) if scpus else len(os.sched_getaffinity(0))} server cores, {acc}")
    out = {"runs": runs, "summary": summary, "claims": claims_from(summary, where)}
    if save:
        extra = {"load_before": load_before, "load_after": machine_load(), "minutes": round((time.time() - t0) / 60, 1),
                 "servers": {n: cfgs[n].__dict__ for n in names}, "server": server or {},
                 "cpus_here": len(os.sched_getaffinity(0))}
        results.save(runs, "serving", "fair_runs" + tag, params=p, scale=scale, extra=extra)
        results.save(summary, "serving", "fair" + tag, params=p, scale=scale, extra=extra)
        if claims and len(out["claims"]):
            results.save(out["claims"], "serving", "claims_fair", params=p, scale=scale, extra=extra)
    return out
