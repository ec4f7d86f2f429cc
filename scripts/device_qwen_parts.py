"""Carry the SplitReason model pair (SmolLM2-135M + Qwen2.5-Coder-1.5B GGUFs, 1.2 GB) to the device in parts, and
run the trigger evaluation there, resumably. A device call carries at most 64 MiB with the tree, so the two GGUFs
travel as one zlib stream cut into ``--part-mib`` parts (one part per call), each checked against a sha256
manifest, and are assembled into /tmp (which lasts while the machine stays warm, at most 30 minutes held).

Here (where the assets are), once:

    python scripts/device_qwen_parts.py split       # .device-carry/qwen/part00..partNN + manifest.json (~1 min)
    python scripts/device_qwen_parts.py problems    # .device-carry/qwen/problems_{eval,calib}.jsonl (~40 s)

There, every call the same command (only the carried part changes; see ``session-plan`` below):

    python3 scripts/device_qwen_parts.py device --deadline-s 570

``device`` is idempotent: it stashes the parts carried this call (checked) under /tmp/effllm-qwen/parts, assembles
and verifies both GGUFs once all parts are there, and then, in the call's remaining time, runs the evaluation in
two resumable stages: ``latency`` (one process on the idle GPU: calibration, the throughput of each model by four
decode paths, and the first ``--latency-n`` problems in every mode, for measured vs simulated time) and ``main``
(``--workers`` processes over all the held-out problems, the latency stage's thresholds). What it has is packed into
$OUT every call (status.json, qwen_logs.tar.gz, qwen_results.tar.gz, device.log): keep qwen_logs.tar.gz as
``.device-carry/qwen/logs.tar.gz`` and carry it in the next session, so a fresh machine resumes the logs.

``python scripts/device_qwen_parts.py session-plan`` prints the plan (calls, carried paths, minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CARRY = Path(".device-carry/qwen")
WORK = Path("/tmp/effllm-qwen")
ASSETS = ("smollm2-135m", "qwen2.5-1.5b")
MANIFEST = "manifest.json"
GGUF_WHEEL = ".whl/gguf-0.19.0-py3-none-any.whl"
# The evaluation the plan runs (trigger_eval options): the paper's big-chunk size is not used by the triggers;
# windows and spans of 16 tokens, budgets 10% and 25%, plus step-level speculation and assisted generation.
EVAL_ARGS = ["--max-new-tokens", "256", "--window", "16", "--big-span", "16", "--step-window", "32",
             "--budgets", "0.1", "0.25", "--kinds", "entropy", "gap", "--step-budgets", "0.25",
             "--device", "cuda", "--dtype", "bfloat16", "--threads", "1", "--scale", "full"]

LEAN_ARGS = ["--max-new-tokens", "256", "--window", "16", "--big-span", "16", "--budgets", "0.1", "0.25",
             "--kinds", "gap", "--step-budgets", "--no-assisted", "--device", "cuda", "--dtype", "bfloat16",
             "--threads", "1", "--scale", "full"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    from effllm_lib.assets import sha256_file

    return sha256_file(path)


# ------------------------------------------------------------------------------------------------ split (here)
def asset_path(name: str) -> Path:
    from effllm_lib import assets

    return {"smollm2-135m": assets.smollm2_gguf, "qwen2.5-1.5b": assets.qwen25_gguf}[name]()


def split(out: Path, names=ASSETS, part_mib: float = 55.0, level: int = 6) -> dict:
    """Cut the zlib stream of the assets' files (concatenated) into parts of at most ``part_mib`` MiB; write the
    manifest. A second call with the same files and part size rewrites nothing."""
    if part_mib <= 0 or part_mib > 60:
        raise ValueError(f"part_mib must be in (0, 60] (a call carries 64 MiB with the tree), got {part_mib}")
    files = [{"asset": n, "name": asset_path(n).name, "size": asset_path(n).stat().st_size,
              "sha256": sha256(asset_path(n))} for n in names]
    part_bytes = int(part_mib * 2**20)
    out.mkdir(parents=True, exist_ok=True)
    old = out / MANIFEST
    if old.is_file():
        m = json.loads(old.read_text())
        if m.get("files") == files and m.get("part_bytes") == part_bytes and all(
                (out / p["name"]).is_file() and (out / p["name"]).stat().st_size == p["size"] for p in m["parts"]):
            log(f"{old}: parts already cut for these files ({len(m['parts'])} parts)")
            return m
    for stale in out.glob("part*"):
        stale.unlink()
    parts, buf, comp = [], bytearray(), zlib.compressobj(level)

    def flush(final=False):
        while len(buf) >= part_bytes or (final and buf):
            chunk, rest = bytes(buf[:part_bytes]), buf[part_bytes:]
            buf[:] = rest
            name = f"part{len(parts):02d}"
            (out / name).write_bytes(chunk)
            parts.append({"name": name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
            log(f"{name}: {len(chunk) / 2**20:.1f} MiB")

    for n in names:
        with open(asset_path(n), "rb") as f:
            for block in iter(lambda: f.read(1 << 23), b""):
                buf += comp.compress(block)
                flush()
    buf += comp.flush()
    flush(final=True)
    manifest = {"format": "zlib stream of the files concatenated in order, cut into parts", "files": files,
                "part_bytes": part_bytes, "parts": parts}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    log(f"{len(parts)} parts, {sum(p['size'] for p in parts) / 2**20:.0f} MiB for "
        f"{sum(f['size'] for f in files) / 2**20:.0f} MiB of files")
    return manifest


def export_problems(out: Path, n_per_source: int, calib_per_source: int) -> None:
    from effllm_lib.offload.trigger_eval import held_out_problems

    ev, cal = held_out_problems(n_per_source, calib_per_source)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("problems_eval.jsonl", ev), ("problems_calib.jsonl", cal)):
        (out / name).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        log(f"{out / name}: {len(rows)} problems")


# ---------------------------------------------------------------------------------------------- device (there)
def stash(carry: Path, work: Path) -> tuple[dict, list[str]]:
    """Copy the carried parts that match the manifest into ``work/parts``; returns (manifest, missing parts)."""
    src = carry / MANIFEST
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no manifest (carry {carry}/{MANIFEST} with every call)")
    manifest = json.loads(src.read_text())
    (work / "parts").mkdir(parents=True, exist_ok=True)
    kept = work / MANIFEST
    if kept.is_file() and json.loads(kept.read_text()) != manifest:
        raise RuntimeError(f"{kept} differs from the carried manifest: parts of another split are in {work}; "
                           f"remove {work} or carry the matching manifest")
    kept.write_text(src.read_text())
    for p in manifest["parts"]:
        have = work / "parts" / (p["name"] + ".ok")
        if have.is_file():
            continue
        carried = carry / p["name"]
        if not carried.is_file():
            continue
        if carried.stat().st_size != p["size"] or sha256(carried) != p["sha256"]:
            raise RuntimeError(f"{carried}: size or sha256 differs from the manifest (a broken transfer; carry it "
                               "again)")
        tmp = work / "parts" / (p["name"] + ".tmp")
        shutil.copyfile(carried, tmp)
        tmp.rename(work / "parts" / p["name"])
        have.write_text(p["sha256"])
        log(f"stashed {p['name']}")
    missing = [p["name"] for p in manifest["parts"] if not (work / "parts" / (p["name"] + ".ok")).is_file()]
    return manifest, missing


def assemble(manifest: dict, work: Path) -> dict[str, Path]:
    """Decompress the parts into ``work/models`` and check each file's sha256 (once: a stamp marks it done)."""
    models = work / "models"
    models.mkdir(parents=True, exist_ok=True)
    paths = {f["asset"]: models / f["name"] for f in manifest["files"]}
    if all((models / (f["name"] + ".verified")).is_file() and (models / f["name"]).is_file()
           for f in manifest["files"]):
        return paths
    t0 = time.perf_counter()
    dec = zlib.decompressobj()
    files = iter(manifest["files"])
    cur = next(files)
    out = open(models / (cur["name"] + ".tmp"), "wb")
    h, written = hashlib.sha256(), 0

    def finish(f):
        out.close()
        if written != f["size"] or h.hexdigest() != f["sha256"]:
            raise RuntimeError(f"{f['name']}: assembled {written} bytes with sha256 {h.hexdigest()[:16]}..., the "
                               f"manifest says {f['size']} and {f['sha256'][:16]}...")
        (models / (f["name"] + ".tmp")).rename(models / f["name"])
        (models / (f["name"] + ".verified")).write_text(f["sha256"])
        log(f"assembled and verified {f['name']} ({f['size'] / 2**20:.0f} MiB)")

    for p in manifest["parts"]:
        data = dec.decompress((work / "parts" / p["name"]).read_bytes())
        while data:
            take = data[:cur["size"] - written]
            out.write(take)
            h.update(take)
            written += len(take)
            data = data[len(take):]
            if written == cur["size"]:
                finish(cur)
                cur = next(files, None)
                if cur is None:
                    if data or dec.flush():
                        raise RuntimeError("the stream holds more than the manifest's files")
                    break
                out = open(models / (cur["name"] + ".tmp"), "wb")
                h, written = hashlib.sha256(), 0
    if cur is not None:
        raise RuntimeError(f"the parts end before {cur['name']} is complete ({written} of {cur['size']} bytes)")
    for p in manifest["parts"]:  # verified files: the parts are no longer needed
        (work / "parts" / p["name"]).unlink(missing_ok=True)
    log(f"assembled in {time.perf_counter() - t0:.0f} s")
    return paths


def _complete_problems(log_dir: Path) -> int:
    """Problems done in every mode of a single-process log dir (the fewest lines over its mode logs)."""
    logs = list(log_dir.glob("*.jsonl"))
    if not logs:
        return 0
    return min(sum(1 for line in f.read_text().splitlines() if line.strip()) for f in logs)


def _main_done(main_dir: Path) -> int:
    """Problems complete in every mode over the workers' logs (w0/, w1/, ...)."""
    ids: dict[str, set] = {}
    for f in main_dir.glob("w*/*.jsonl"):
        for line in f.read_text().splitlines():
            if line.strip():
                try:
                    ids.setdefault(f.name, set()).add(json.loads(line)["problem_id"])
                except (ValueError, KeyError):
                    continue  # a line cut short by a kill: read_log drops it too
    return min((len(v) for v in ids.values()), default=0)


def run_eval(args, paths: dict, log_dir: Path, *, workers: int, n: int, budget_s: float, suffix: str,
             extra=()) -> int:
    """trigger_eval in its own process group, killed if it runs past ``budget_s`` + the grace time."""
    small, big = (args.models.split(",") if args.models else (paths["smollm2-135m"], paths["qwen2.5-1.5b"]))
    cmd = [sys.executable, "-m", "effllm_lib.offload.trigger_eval", "--small", str(small), "--big", str(big),
           "--problems", str(args.carry / "problems_eval.jsonl"),
           "--calib-problems", str(args.carry / "problems_calib.jsonl"), "--n", str(n), "--n-calib", "100000",
           "--workers", str(workers), "--log-dir", str(log_dir), "--time-budget-s", f"{budget_s:.0f}",
           "--suffix", suffix, *(LEAN_ARGS if args.lean else EVAL_ARGS), *extra, *shlex.split(args.eval_extra)]
    log("run: " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    try:
        return proc.wait(timeout=budget_s + args.grace_s)
    except subprocess.TimeoutExpired:
        log(f"past {budget_s + args.grace_s:.0f} s: stopping the evaluation (the logs keep every finished line)")
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


def pack(args, work: Path, status: dict) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "status.json").write_text(json.dumps(status, indent=1, default=str) + "\n")
    logs = work / "logs"
    if logs.is_dir():
        with tarfile.open(out / "qwen_logs.tar.gz", "w:gz") as tar:
            tar.add(logs, arcname="logs")
    from effllm_lib.results import results_dir

    folder = results_dir("splitreason")  # full-scale files there, ci-scale ones in ci/
    res = sorted(f for pattern in (f"trigger_*{args.suffix}*.csv", f"throughput{args.suffix}*.csv")
                 for sub in (folder, folder / "ci") for f in sub.glob(pattern))
    if res:
        with tarfile.open(out / "qwen_results.tar.gz", "w:gz") as tar:
            for f in res:
                tar.add(f, arcname=f.name)
    for f in out.iterdir():
        if f.stat().st_size > 16 * 2**20:
            log(f"warning: {f.name} is {f.stat().st_size / 2**20:.1f} MiB, over the 16 MiB a returned file may be")


def device(args) -> int:
    t0 = time.perf_counter()
    work = Path(args.work)
    left = lambda: args.deadline_s - (time.perf_counter() - t0) - args.pack_s  # noqa: E731
    status = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "effllm_commit": os.environ.get("EFFLLM_COMMIT")}
    manifest, missing = stash(args.carry, work)
    status.update(parts=len(manifest["parts"]), missing_parts=missing)
    if missing:
        log(f"{len(manifest['parts']) - len(missing)}/{len(manifest['parts'])} parts here; next: carry "
            f"{args.carry}/{missing[0]} (missing: {' '.join(missing)})")
        pack(args, work, status)
        return 0
    paths = assemble(manifest, work)
    logs = work / "logs"
    saved = args.carry / "logs.tar.gz"
    if not logs.is_dir() and saved.is_file():  # a fresh machine: continue the logs of an earlier session
        with tarfile.open(saved) as tar:
            tar.extractall(work, filter="data")
        log(f"resumed the logs of {saved}")
    lat_dir, main_dir = logs / "latency", logs / "main"
    lat_dir.mkdir(parents=True, exist_ok=True)
    main_dir.mkdir(parents=True, exist_ok=True)
    stages = []
    if _complete_problems(lat_dir) < args.latency_n and left() > 120:
        budget = min(args.latency_budget_s, left() - args.grace_s)
        rc = run_eval(args, paths, lat_dir, workers=1, n=args.latency_n, budget_s=budget,
                      suffix=args.suffix + "_idle", extra=["--latency"])
        stages.append({"stage": "latency", "rc": rc, "done_problems": _complete_problems(lat_dir)})
    if (lat_dir / "thresholds.json").is_file() and not (main_dir / "thresholds.json").is_file():
        shutil.copyfile(lat_dir / "thresholds.json", main_dir / "thresholds.json")  # one calibration for both
    if (main_dir / "thresholds.json").is_file() and left() > 150:
        n = sum(1 for line in (args.carry / "problems_eval.jsonl").read_text().splitlines() if line.strip())
        rc = run_eval(args, paths, main_dir, workers=args.workers, n=n, budget_s=left() - args.grace_s,
                      suffix=args.suffix)
        stages.append({"stage": "main", "rc": rc, "done_problems": _main_done(main_dir), "of": n})
    status.update(stages=stages, wall_s=time.perf_counter() - t0)
    log(json.dumps(status, default=str))
    pack(args, work, status)
    return 0


def session_plan(args) -> str:
    n_parts = len(json.loads((args.carry / MANIFEST).read_text())["parts"]) if (args.carry / MANIFEST).is_file() \
        else 21
    base = [f"{args.carry}/{MANIFEST}", f"{args.carry}/problems_eval.jsonl", f"{args.carry}/problems_calib.jsonl",
            GGUF_WHEEL]
    if (args.carry / "logs.tar.gz").is_file():
        base.append(f"{args.carry}/logs.tar.gz")
    pre = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
           f"{GGUF_WHEEL} && export PYTHONPATH=/tmp/site:. EFFLLM_COMMIT=<sha> EFFLLM_DIRTY=0 && ")
    lines = [f"Qwen session: {n_parts} carry calls, then evaluation calls; all on one warm machine (/tmp is lost "
             "when it goes back: then the carry calls start again, the logs resume from logs.tar.gz).",
             f"carry calls 1..{n_parts} (~20-40 s each with the transfer; ~{n_parts * 0.5:.0f} min): carry "
             f"{base} + {args.carry}/partNN (NN = 00..{n_parts - 1:02d}, one per call), command:",
             f"  {pre}timeout 590 python3 scripts/device_qwen_parts.py device --deadline-s 570",
             "  (each call stashes its part; the last one assembles and verifies both GGUFs, then starts evaluating;"
             " status.json in $OUT says which part is missing and how many problems are done)",
             "evaluation calls (9.5 min each, same carry without a part, same command): the first converts the GGUFs "
             "(~1 min), runs the latency stage (calibration ~2 min, throughputs by 4 decode paths ~3-4 min, then "
             f"{args.latency_n} problems x 10 modes in one process), the rest run the main stage with "
             f"{args.workers} workers.",
             "Estimate (from notebook 02's H100 run: 12 workers, ~9 s wall per problem for 6 modes at 384 tokens): "
             "~6 s wall per problem for these 10 modes at 256 tokens with 14 workers, i.e. ~80 problems per "
             "evaluation call; the 1,200 problems need ~15 evaluation calls (~2.4 h of device time). A machine is "
             "held 30 minutes at most, so a session gives ~2 evaluation calls after its carry calls: plan ~7 "
             "sessions, or pass --lean (6 modes: small, big, gap and random at 10/25%: ~half the time).",
             "After every call: keep $OUT/qwen_logs.tar.gz as .device-carry/qwen/logs.tar.gz (the resume), and "
             "$OUT/qwen_results.tar.gz (trigger_modes/records, throughput, trigger_latency with suffix _h200 and "
             "_h200_idle) for merging."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="cut the two GGUFs into carry parts + manifest (here)")
    sp.add_argument("--out", type=Path, default=CARRY)
    sp.add_argument("--part-mib", type=float, default=55.0, help="part size; the tree (~6 MiB) travels with it")
    pp = sub.add_parser("problems", help="export the held-out problems (here)")
    pp.add_argument("--out", type=Path, default=CARRY)
    pp.add_argument("--n-per-source", type=int, default=400, help="evaluation problems per source (3 sources)")
    pp.add_argument("--calib-per-source", type=int, default=4)
    dp = sub.add_parser("device", help="stash, assemble, evaluate (on the device; idempotent, resumable)")
    dp.add_argument("--carry", type=Path, default=CARRY)
    dp.add_argument("--work", default=str(WORK))
    dp.add_argument("--out", default=os.environ.get("OUT", "/tmp/effllm-qwen-out"))
    dp.add_argument("--deadline-s", type=float, default=570.0, help="seconds this call may use, packing included")
    dp.add_argument("--pack-s", type=float, default=20.0)
    dp.add_argument("--grace-s", type=float, default=90.0, help="a problem in flight when the budget ends")
    dp.add_argument("--workers", type=int, default=14)
    dp.add_argument("--latency-n", type=int, default=12, help="problems of the one-process latency stage")
    dp.add_argument("--latency-budget-s", type=float, default=420.0)
    dp.add_argument("--suffix", default="_h200")
    dp.add_argument("--lean", action="store_true",
                    help="6 modes (small, big, gap and random at 10/25%%): no entropy, step-spec or assisted")
    dp.add_argument("--eval-extra", default="", help="more trigger_eval options, last (they win), e.g. "
                    "'--max-new-tokens 192'")
    dp.add_argument("--models", default=None, help=argparse.SUPPRESS)  # SMALL,BIG instead of the GGUFs (tests)
    lp = sub.add_parser("session-plan", help="print the device session plan")
    lp.add_argument("--carry", type=Path, default=CARRY)
    lp.add_argument("--workers", type=int, default=14)
    lp.add_argument("--latency-n", type=int, default=12)
    args = ap.parse_args(argv)
    if args.cmd == "split":
        split(args.out, part_mib=args.part_mib)
    elif args.cmd == "problems":
        export_problems(args.out, args.n_per_source, args.calib_per_source)
    elif args.cmd == "device":
        return device(args)
    else:
        print(session_plan(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
