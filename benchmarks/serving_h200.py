"""Every serving measurement the chapter needs from the H200 machine, in two device calls of under 9.5 minutes.

    PART=1 bash scripts/device_serving_h200.sh      # GPU side, ~7.5 min
    PART=2 bash scripts/device_serving_h200.sh      # fair comparison, pipeline, broker cost, ~7 min
    PART=2 STEPS=durability bash scripts/device_serving_h200.sh   # resume: only the steps named
    python benchmarks/serving_h200.py --part 1 --scale ci     # dry run anywhere (CPU only: GPU parts skipped)

Part 1 (expected minutes in brackets, on the H200 host: 16 cores):
  * ``loaded``: the per-stage breakdown under load with batching (``loaded.run``): decoders Pillow,
    libjpeg-turbo, nvJPEG per request and nvJPEG batched, medium and large photos [3.0];
  * ``optimizations``: the naive design, each optimization alone (pinned memory included), combined, and the
    GPU-decode designs, per request and batched (``experiments.run_optimizations_suite``, ``H200_OPTIMIZATIONS``:
    12 designs), 3 passes of 4 s, servers booted at once [4.5].
Part 2:
  * ``fair``: prior-work batching servers vs the optimized designs at equal resources (``fair.run``), servers on
    cores 0-7, the load generator on 8-15, 9 designs (the nvJPEG baseline and the batched-nvJPEG design added),
    3 passes of 6 s [4.0];
  * ``pipeline``: detector -> broker -> classifier over queue, shared memory and Redis with both DNNs on the GPU
    (``experiments.run_pipeline_suite``, 12 medium photos at 1/s, 4 crops each, 2 rounds), the broker share [2.5];
  * ``durability``: what Redis's appendfsync setting costs a message, append-only files on the disk [0.5].

Each step saves its results with ``--suffix`` (default ``_h200``) through ``results.save`` (at ``--scale ci``
into data/results/serving/ci/); a step that fails is reported and the others still run; a step that would not
finish within ``--budget-s`` is skipped with a message. Where CUDA (or torchvision's nvJPEG) is missing the GPU
designs are skipped with a message and the servers run on the CPU: that is a dry run, refused at full scale.
The device settings (passes, durations) differ from the suites' ``full`` tables only where said below; they
are in each file's provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback

from effllm_lib.serving import broker, experiments, fair, loaded

# the suites' full tables, shortened to fit the device calls (recorded in each file's params)
H200_FULL = {
    "loaded": {"duration": 5.0, "passes": 3},
    "optimizations": {"duration": 4.0, "passes": 3, "parallel_boot": True},
    "fair": {"passes": 3},
}
# the optimizations measured on the H200: each alone, combined (2 workers) and the GPU-decode designs; the two
# "combined, 1 worker" variants of the CPU run are left out to fit the call
H200_OPTIMIZATIONS = tuple(d for d in experiments.OPTIMIZATIONS if not d.startswith("combined, 1 worker")) + tuple(
    experiments.GPU_OPTIMIZATIONS)
PARTS = {1: ("loaded", "optimizations"), 2: ("fair", "pipeline", "durability")}
ESTIMATE_MIN = {"loaded": 3.0, "optimizations": 4.5, "fair": 4.0, "pipeline": 2.5, "durability": 0.5}
CI_ESTIMATE_MIN = {"loaded": 0.5, "optimizations": 0.5, "fair": 0.5, "pipeline": 0.7, "durability": 0.2}


def gpu_status() -> tuple[bool, str]:
    """(whether the GPU designs can run, why not)."""
    import torch

    if not torch.cuda.is_available():
        return False, "CUDA is not available (torch.cuda.is_available() is False)"
    from effllm_lib.serving import preprocess as pp

    try:
        pp.nvjpeg_batch_decoder("cuda")
    except RuntimeError as exc:
        return False, str(exc)
    return True, torch.cuda.get_device_name(0)


def redis_status() -> tuple[bool, str]:
    import subprocess

    if not broker.redis_available():
        return False, "redis-server is not on PATH"
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10)
    except OSError as exc:
        return False, f"redis-server does not start: {exc}"
    if out.returncode != 0:
        return False, f"redis-server does not start: {(out.stderr or out.stdout).strip()[:300]}"
    return True, out.stdout.strip()


def cpu_split() -> tuple[str | None, str | None]:
    """Servers on the first half of the cores, the load generator on the second (0-7 / 8-15 on the H200 host)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    half = len(cpus) // 2
    return ",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:]))


@contextlib.contextmanager
def scale_table(table: dict, scale: str, changes: dict):
    """``table[scale]`` with ``changes`` while the step runs (the suites record the table they used)."""
    old = table[scale]
    table[scale] = {**old, **changes}
    try:
        yield
    finally:
        table[scale] = old


def run_step(name: str, *, scale: str, suffix: str, gpu: bool, redis: bool, server: dict) -> str:
    """Run one step; returns a one-line summary."""
    full = scale == "full"
    if name == "loaded":
        with scale_table(loaded.SCALES, scale, H200_FULL["loaded"] if full else {}):
            out = loaded.run(scale, save=True, server=server, tag=suffix)
        b = out["breakdown"]
        return "; ".join(f"{r.decoder}/{r['size']}: {r.throughput_rps:.1f} req/s, preprocessing {r.preprocess_share:.0f}%"
                         for _, r in b.iterrows())
    if name == "optimizations":
        with scale_table(experiments.OPT_SCALES, scale, H200_FULL["optimizations"] if full else {}):
            configs = H200_OPTIMIZATIONS if full else ("naive", "pinned host memory", "combined") + (
                ("combined, GPU decode", "combined, batched GPU decode") if gpu else ())
            out = experiments.run_optimizations_suite(scale, save=True, server=server, tag=suffix, configs=configs)
        s = out["summary"]
        return "; ".join(f"{r.design}: {r.speedup:.2f}x" for _, r in s.iterrows())
    if name == "fair":
        scpus, ccpus = cpu_split()
        with scale_table(fair.SCALES, scale, H200_FULL["fair"] if full else {}):
            designs = None if full else (("prior work: batching, Pillow", "optimized: combined")
                                         + (("prior work: batching, nvJPEG", "optimized: batched nvJPEG on the GPU")
                                            if gpu else ()))
            out = fair.run(scale, save=True, server=server, tag=suffix, server_cpus=scpus, client_cpus=ccpus,
                           designs=designs)
        s = out["summary"]
        return f"cores {scpus} / {ccpus}; " + "; ".join(f"{r.design}: {r.ratio_of_medians:.2f}x" for _, r in s.iterrows())
    if name == "pipeline":
        device = "cuda" if gpu else "cpu"
        brokers = experiments.PIPELINE_SCALES[scale]["brokers"]
        if not redis:
            brokers = tuple(b for b in brokers if b != "redis")
            print("  redis-server is not available: the pipeline runs without the Redis broker", flush=True)
        with scale_table(experiments.PIPELINE_SCALES, scale, {"brokers": brokers}):
            out = experiments.run_pipeline_suite(scale, save=True, tag=suffix, device=device)
        s = out["summary"]
        return f"DNNs on {device}; " + "; ".join(f"{r.broker}: broker {r.broker_ms:.2f} ms, {r.broker_share:.1f}%"
                                                for _, r in s.iterrows())
    if name == "durability":
        if not redis:
            return "SKIPPED: redis-server is not available"
        import shutil
        import tempfile

        workdir = tempfile.mkdtemp(prefix=".durability-aof-", dir=".")  # on the tree's disk, not on a tmpfs
        try:
            out = experiments.run_durability_suite(scale, save=True, workdir=os.path.abspath(workdir), tag=suffix)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        s = out["summary"]
        return "; ".join(f"{r.appendfsync} ({r.filesystem}): {r.message_p50_us:.0f} us/message" for _, r in s.iterrows())
    raise ValueError(f"unknown step {name!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", type=int, choices=sorted(PARTS), required=True)
    ap.add_argument("--scale", choices=("ci", "full"), default="full")
    ap.add_argument("--suffix", default="_h200", help="suffix of the results names")
    ap.add_argument("--steps", default=None, help="comma-separated subset of the part's steps (to resume)")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="skip a step that would not finish within this many seconds of the start")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    steps = PARTS[args.part]
    if args.steps:
        want = tuple(s.strip() for s in args.steps.split(",") if s.strip())
        bad = set(want) - set(steps)
        if bad:
            ap.error(f"steps {sorted(bad)} are not in part {args.part} {steps}")
        steps = want
    gpu, why = gpu_status()
    redis, rwhy = redis_status()
    if args.scale == "full" and not gpu:
        print(f"the full run is the H200 measurement and needs the GPU: {why}", file=sys.stderr)
        return 2
    print(f"GPU: {why}" if gpu else f"GPU designs SKIPPED: {why}; servers run on the CPU (dry run)", flush=True)
    print(f"redis: {rwhy}", flush=True)
    server = {"pretrained": False}  # timing does not depend on the weights; no checkpoint lookups in the servers
    if gpu:
        server["accelerator"] = "cuda"
    est = ESTIMATE_MIN if args.scale == "full" else CI_ESTIMATE_MIN
    failed = 0
    for name in steps:
        left = args.budget_s - (time.monotonic() - t0)
        if 60 * est[name] > left:
            print(f"[{name}] SKIPPED: expected {est[name]:.1f} min, {left / 60:.1f} min left of the budget; "
                  f"rerun with --steps {name}", flush=True)
            continue
        t = time.monotonic()
        print(f"[{name}] starting (expected {est[name]:.1f} min)", flush=True)
        try:
            summary = run_step(name, scale=args.scale, suffix=args.suffix, gpu=gpu, redis=redis, server=server)
            print(f"[{name}] done in {(time.monotonic() - t) / 60:.1f} min: {summary}", flush=True)
        except Exception:  # noqa: BLE001 - report and go on: the other steps' results still count
            failed += 1
            print(f"[{name}] FAILED after {(time.monotonic() - t) / 60:.1f} min:\n{traceback.format_exc()}", flush=True)
    print(f"part {args.part}: {len(steps) - failed} of {len(steps)} steps done in "
          f"{(time.monotonic() - t0) / 60:.1f} min", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
