"""Accuracy vs offload for the training-free triggers and the two established baselines, on the same problems.

Modes (``trigger_grid``): the small model alone, the big model alone, each trigger of ``triggers.py`` (entropy,
likelihood gap, ...) at a few budgets, random switching at the same budgets (same windows, spans and guard; only
where the handoffs land differs), step-level speculative reasoning, and assisted generation (``assisted.py``).

Thresholds come from calibration problems (a different seed from the evaluation problems): each trigger runs
there with no handoffs and the pooled window scores give one threshold per budget (``triggers.threshold_for``).

Every problem goes through every mode before the next starts (a time budget leaves all modes with the same
problems); one resumable JSON-lines log per mode. ``summarize`` gives pass@1 with a bootstrap interval
(``stats.bootstrap_ci``, over problems), the paired difference to random switching at the same budget, the
offload fraction, handoffs per problem and wall time.

CLI (``python -m effllm_lib.offload.trigger_eval --help``) runs calibration + evaluation and saves
``splitreason/trigger_modes`` (summary) and ``splitreason/trigger_records`` (per completion, with its text);
``--latency`` also measures each model's throughput alone first (``latency.py``) and saves ``throughput`` and
``trigger_latency`` (measured vs sequential vs pipelined-simulated time per mode, time in probes, handoffs).

Device session plan (the Qwen pair on the H200; ``scripts/device_qwen_parts.py``, whose ``session-plan`` prints it):

* Here, once: ``python scripts/device_qwen_parts.py split`` (SmolLM2 + Qwen2.5-1.5B GGUFs as one zlib stream in
  ~20 parts of <= 55 MiB + a sha256 manifest, under ``.device-carry/qwen``; ~1-2 min) and ``... problems``
  (``held_out_problems(400, 4)``: 1,200 evaluation problems, 400 each of gsm_symbolic held-out templates,
  multistep_arithmetic, elementary_math_qa, interleaved; 12 calibration problems, disjoint).
* There, every call the same command ``timeout 590 python3 scripts/device_qwen_parts.py device --deadline-s 570``
  (after installing the carried gguf wheel into /tmp/site), carrying the manifest, the two problem files, the gguf
  wheel, ``logs.tar.gz`` when a previous session left one, and one part:
  - calls 1..P (P = number of parts, ~20; ~0.5 min each): each stashes its part (checked) under /tmp; the last
    assembles and verifies both GGUFs (~10 s) and goes straight on to evaluating;
  - evaluation calls (9.5 min each, no part carried): GGUF -> bfloat16 conversion once (~1 min); the latency stage
    in one process on the idle GPU (calibration ~2 min, throughput by 4 decode paths ~3-4 min, then 12 problems in
    every mode; suffix ``_h200_idle``), then the main stage: 14 worker processes over the 1,200 problems, every
    mode per problem (paired), no new problem after the call's budget (suffix ``_h200``).
  - Estimate: ~6 s wall per problem for the 10 modes at 256 tokens, ~80 problems per evaluation call, ~15 calls
    (~2.4 h of device time) for all 1,200; a machine is held 30 min at most (then /tmp is gone and the carry calls
    repeat), i.e. ~2 evaluation calls per session: ~7 sessions, or half with ``--lean`` (6 modes).
* After every call: $OUT/qwen_logs.tar.gz -> ``.device-carry/qwen/logs.tar.gz`` (the resume) and
  $OUT/qwen_results.tar.gz (trigger_modes / trigger_records / throughput / trigger_latency) to commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from ..stats import bootstrap_ci
from .assisted import assisted_generate, assisted_record
from .baselines import log_name, run_round_robin
from .controller import Controller
from .problems import SOURCES, Problem, build_prompt, evaluate, load_problems
from .triggers import TriggerConfig, TriggerController, calibrate_threshold, threshold_for

TRIGGER_KINDS = ("entropy", "gap")


def trigger_grid(budgets=(0.15, 0.3), kinds=TRIGGER_KINDS, step_budgets=(0.3,), assisted: bool = True) -> list[dict]:
    """The modes to compare: dicts with ``label``, ``method`` (small/big/trigger/assisted), ``kind``, ``budget``."""
    budgets = [float(b) for b in budgets]
    if any(not 0 < b < 1 for b in budgets + [float(b) for b in step_budgets]):
        raise ValueError(f"budgets are offload fractions in (0, 1), got {budgets} and {list(step_budgets)}")
    grid = [{"label": "small only", "method": "small"}, {"label": "big only", "method": "big"}]
    for kind in list(kinds) + ["random"]:
        for b in budgets:
            grid.append({"label": f"{kind} {round(100 * b):g}%", "method": "trigger", "kind": kind, "budget": b})
    for b in step_budgets:
        grid.append({"label": f"step-spec {round(100 * float(b)):g}%", "method": "trigger", "kind": "step",
                     "budget": float(b)})
    if assisted:
        grid.append({"label": "assisted", "method": "assisted"})
    return grid


def calibrate(small, big, problems: list[Problem], grid: list[dict], *, window: int, big_span: int,
              max_new_tokens: int, step_window: int) -> dict:
    """``{label: threshold}`` for the trigger modes of ``grid``, from runs with no handoffs on ``problems``; also
    ``{"scores": {kind: [...]}}`` (one calibration run per kind, shared by its budgets)."""
    prompts = [(build_prompt(small[1], p.question), build_prompt(big[1], p.question)) for p in problems]
    scores, out = {}, {}
    for spec in grid:
        if spec["method"] != "trigger":
            continue
        kind = spec["kind"]
        w = step_window if kind == "step" else window
        cfg = TriggerConfig(kind, spec["budget"], window=w, big_span=w if kind == "step" else big_span)
        if kind == "random":
            out[spec["label"]] = calibrate_threshold(small, big, prompts, cfg)[0]
            continue
        if kind not in scores:
            scores[kind] = calibrate_threshold(small, big, prompts, cfg, max_new_tokens=max_new_tokens)[1]
        # step: windows and spans both end at the delimiter, so q = f (W = S)
        out[spec["label"]] = threshold_for(scores[kind], spec["budget"], w, cfg.big_span)
    out["scores"] = scores
    return out


HELD_OUT_SOURCES = ("gsm_symbolic", "multistep_arithmetic", "elementary_math_qa")


def held_out_problems(n_per_source: int, calib_per_source: int, *, gsm_seed: int = 0, seed: int = 1
                      ) -> tuple[list[dict], list[dict]]:
    """(evaluation rows, calibration rows) in ``parallel.export-problems``' format, the sources interleaved
    (a run cut short by its time budget still covers them evenly).

    gsm_symbolic: items of the held-out templates only (``sft_data.gsm_items("held_out", ...)``, the ones the
    trained small model never sees; the evaluation of part 2 uses the same draw). multistep_arithmetic and
    elementary_math_qa: ``load_problems(source, n + k, seed)`` (seed 1: the first 200 multistep problems are
    notebook 02's). Each source's first ``n_per_source`` are evaluated, its next ``calib_per_source`` calibrate
    the thresholds: disjoint by construction."""
    from .sft_data import gsm_items

    if n_per_source < 1 or calib_per_source < 0:
        raise ValueError(f"n_per_source must be >= 1 and calib_per_source >= 0, got {n_per_source}, {calib_per_source}")
    total = n_per_source + calib_per_source
    per_source = {}
    for source in HELD_OUT_SOURCES:
        if source == "gsm_symbolic":
            rows = [{"id": t.id, "source": source, "question": t.question, "answer": t.answer, "template": t.template,
                     "seed": gsm_seed, "n": total, "draw": "sft_data.gsm_items('held_out', n, seed)"}
                    for t in gsm_items("held_out", total, seed=gsm_seed)]
        else:
            rows = [{"id": p.id, "source": source, "question": p.question, "answer": p.answer, "seed": seed,
                     "n": total, "draw": "problems.load_problems(source, n, seed)"}
                    for p in load_problems(source, total, seed=seed)]
        for i, r in enumerate(rows):
            r["index"] = i
        per_source[source] = rows
    evaluation = [per_source[s][i] for i in range(n_per_source) for s in HELD_OUT_SOURCES]
    calibration = [per_source[s][n_per_source + i] for i in range(calib_per_source) for s in HELD_OUT_SOURCES]
    return evaluation, calibration


def make_generate(small, big, spec: dict, thresholds: dict, *, window: int, big_span: int, max_new_tokens: int,
                  step_window: int, num_assistant_tokens: int = 4):
    """``generate(problem, sample)`` for ``problems.evaluate`` in the mode ``spec`` names."""
    method = spec["method"]

    def generate(problem: Problem, sample: int) -> dict:
        sp, bp = build_prompt(small[1], problem.question), build_prompt(big[1], problem.question)
        prompts = {"small_prompt_tokens": len(small[1](sp, add_special_tokens=False)["input_ids"]),
                   "big_prompt_tokens": len(big[1](bp, add_special_tokens=False)["input_ids"])}
        if method == "assisted":
            res = assisted_generate(small, big, bp, max_new_tokens=max_new_tokens,
                                    num_assistant_tokens=num_assistant_tokens)
            return {"text": res["text"], **assisted_record(res), "label": spec["label"],
                    "generated_tokens": res["generated_tokens"], **prompts}
        if method in ("small", "big"):
            gen = Controller(small, big, max_new_tokens=max_new_tokens).generate(sp, bp, method)
            extra = {"handoffs": 0, "windows": 0}
        elif method == "trigger":
            kind = spec["kind"]
            w = step_window if kind == "step" else window
            cfg = TriggerConfig(kind, spec["budget"], thresholds[spec["label"]], w, w if kind == "step" else big_span)
            seed = zlib.crc32(problem.id.encode()) + sample  # random switching: its own draws per problem
            gen = TriggerController(small, big, cfg, max_new_tokens=max_new_tokens, seed=seed).generate(sp, bp)
            extra = {}
        else:
            raise ValueError(f"unknown method {method!r}")
        return {"text": gen.text, **gen.summary(), **extra, "label": spec["label"],
                "generated_tokens": gen.small.kept_tokens + gen.big.kept_tokens, **prompts}

    return generate


def run_eval(problems: list[Problem], small, big, log_dir, grid: list[dict], thresholds: dict, *,
             time_budget_s: float | None = None, progress: bool = False, **kw) -> pd.DataFrame:
    """Every mode on each problem in turn (resumable logs in ``log_dir``); all records of the problems done."""
    if not problems:
        raise ValueError("run_eval needs at least one problem")
    gens = [(spec, make_generate(small, big, spec, thresholds, **kw), Path(log_dir) / log_name(spec["label"]))
            for spec in grid]
    frames = []
    for spec, df in run_round_robin(problems, gens, time_budget_s=time_budget_s, progress=progress):
        df["method"], df["kind"], df["budget"] = spec["method"], spec.get("kind", spec["method"]), \
            spec.get("budget", math.nan)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def summarize(records: pd.DataFrame, *, n_boot: int = 10_000) -> pd.DataFrame:
    """One row per mode: pass@1 and its 95% bootstrap interval over problems, the paired difference to random
    switching at the same budget (trigger modes), offload % (big tokens kept / all kept), handoffs, time."""
    need = {"label", "problem_id", "correct", "small_kept_tokens", "big_kept_tokens", "wall_s", "handoffs"}
    if records.empty or not need <= set(records.columns):
        raise ValueError(f"records need columns {sorted(need)} (from run_eval)")
    per = {lab: df.sort_values("problem_id").set_index("problem_id") for lab, df in records.groupby("label", sort=False)}
    ids = sorted(set.intersection(*(set(df.index) for df in per.values())))
    rows = []
    for lab, df in per.items():
        df = df.loc[ids]
        acc, lo, hi = bootstrap_ci(np.mean, df.correct.to_numpy(), n_boot=n_boot)
        kept = df.small_kept_tokens.sum() + df.big_kept_tokens.sum()
        row = {"mode": lab, "method": df.method.iloc[0] if "method" in df else "", "kind": df.kind.iloc[0]
               if "kind" in df else "", "budget": float(df.budget.iloc[0]) if "budget" in df else math.nan,
               "problems": len(df), "pass@1": acc, "ci_lo": lo, "ci_hi": hi,
               "big_token_pct": 100.0 * df.big_kept_tokens.sum() / kept if kept else 0.0,
               "handoffs_per_problem": df.handoffs.mean(), "finished_pct": 100.0 * df.finished.mean(),
               "generated_tokens": int(kept), "wall_s_per_problem": df.wall_s.mean(),
               "small_decode_tokens": int(df.small_decode_tokens.sum()),
               "small_rolled_back": int(df.small_rolled_back.sum()),
               "big_prefill_tokens": int(df.big_prefill_tokens.sum()), "big_decode_tokens": int(df.big_decode_tokens.sum()),
               "small_decode_s": df.small_decode_s.sum(), "big_prefill_s": df.big_prefill_s.sum(),
               "big_decode_s": df.big_decode_s.sum()}
        if "drafted_share" in df and df.drafted_share.notna().any():
            row["drafted_pct"] = 100.0 * df.drafted_accepted.sum() / max(1, int(df.generated_tokens.sum()))
            row["big_forwards"] = int(df.big_forwards.sum())
        rnd = f"random {round(100 * row['budget']):g}%" if row["budget"] == row["budget"] else None
        if row["method"] == "trigger" and row["kind"] not in ("random",) and rnd in per:
            d, dlo, dhi = bootstrap_ci(lambda a, b: float(np.mean(a - b)), df.correct.to_numpy(),
                                       per[rnd].loc[ids].correct.to_numpy(), n_boot=n_boot)
            row.update(diff_vs_random=d, diff_lo=dlo, diff_hi=dhi)
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------ CLI
def _load(spec: str, dtype: str, device: str):
    """(model, tokenizer): a packaged model name (``models.MODELS``), a .gguf file, a transformers folder or
    ``tiny:<arch>:<seed>``."""
    import torch

    from .. import models
    from .parallel import DEFAULT_HF_CACHE, check_model_spec, load_model, prepare_model

    if spec in models.MODELS:
        return models.load_causal_lm(spec, dtype=getattr(torch, dtype), device=device)
    info = prepare_model(check_model_spec(spec, "model"), dtype, DEFAULT_HF_CACHE)
    return load_model(info, device, dtype)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m effllm_lib.offload.trigger_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", default="smollm2-135m", help="packaged name, .gguf, transformers folder or tiny:...")
    ap.add_argument("--big", default="qwen2.5-1.5b")
    ap.add_argument("--source", default="multistep_arithmetic", choices=SOURCES)
    ap.add_argument("--seed", type=int, default=1, help="evaluation problems (notebook 02's held-out sample)")
    ap.add_argument("--calib-seed", type=int, default=101, help="calibration problems (disjoint draw)")
    ap.add_argument("--n", type=int, default=200, help="evaluation problems requested")
    ap.add_argument("--n-calib", type=int, default=3)
    ap.add_argument("--problems", default=None, help="exported problems (JSON lines from `python -m "
                    "effllm_lib.offload.parallel export-problems`) instead of --source/--seed/--n: the device has "
                    "no problem assets")
    ap.add_argument("--calib-problems", default=None, help="exported calibration problems (likewise)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.15, 0.3])
    ap.add_argument("--kinds", nargs="+", default=list(TRIGGER_KINDS), choices=["entropy", "margin", "gap"])
    ap.add_argument("--step-budgets", type=float, nargs="*", default=[0.3])
    ap.add_argument("--no-assisted", action="store_true")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--big-span", type=int, default=16)
    ap.add_argument("--step-window", type=int, default=32, help="max tokens of a step (ends at a newline)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--time-budget-s", type=float, default=None, help="no new problem starts after this")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--log-dir", default=None, help="resumable logs (default: the cache)")
    ap.add_argument("--scale", default="full", choices=["ci", "full"])
    ap.add_argument("--suffix", default="", help="appended to the results names (e.g. _h200)")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--latency", action="store_true",
                    help="measure each model's prefill/decode throughput alone first (latency.measure_throughputs, "
                         "kept in the log dir for resumes) and save throughput<suffix> and trigger_latency<suffix> "
                         "(measured vs simulated per mode; meaningful with --workers 1 on an idle device)")
    ap.add_argument("--latency-methods", default="dynamic,static,compiled,generate")
    ap.add_argument("--workers", type=int, default=1,
                    help="N processes on one device: worker k takes problems k, k+N, ... (calibration runs once)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set for the child processes
    ap.add_argument("--thresholds", default=None, help=argparse.SUPPRESS)      # the parent's calibration (JSON)
    return ap


def main(argv=None) -> int:
    run_cli(argv)
    return 0


def _problems(path, source, n, seed) -> list[Problem]:
    """``load_problems(source, n, seed)``, or the first ``n`` of an exported file (same strict scorer)."""
    if path is None:
        return load_problems(source, n, seed=seed)
    from .parallel import provisional_problems, read_problems

    return provisional_problems(read_problems(path))[:n]


def _collect(probs, grid, log_dirs) -> pd.DataFrame:
    """Records of the problems every mode finished, read from the logs of one or several workers."""
    from .problems import read_log

    frames = []
    for spec in grid:
        rows = [r for d in log_dirs for r in read_log(Path(d) / log_name(spec["label"]))]
        df = pd.DataFrame(rows)
        df["method"], df["kind"] = spec["method"], spec.get("kind", spec["method"])
        df["budget"] = spec.get("budget", math.nan)
        frames.append(df)
    done = set.intersection(*(set(df.problem_id) for df in frames)) if all(len(f) for f in frames) else set()
    order = {p.id: i for i, p in enumerate(probs)}
    done &= set(order)
    if not done:
        raise RuntimeError(f"no problem is complete in every mode in {', '.join(map(str, log_dirs))}")
    return pd.concat([df[df.problem_id.isin(done)] for df in frames], ignore_index=True)


def _throughput(args, small, big, log_dir: Path) -> pd.DataFrame:
    """Each model's throughput alone, measured once per log dir and saved after each model (a call cut short
    resumes with the model not yet measured)."""
    from .latency import measure_throughputs

    saved = log_dir / "throughput.json"
    rows = json.loads(saved.read_text()) if saved.is_file() else []
    methods = [m for m in args.latency_methods.split(",") if m]
    for role, (m, t) in (("small", small), ("big", big)):
        if any(r["model"] == role for r in rows):
            continue
        table = measure_throughputs(m, t, name=role, methods=methods, decode_tokens=64, repeats=3)
        print(table.drop(columns=["first_tokens"], errors="ignore").round(2).to_string(index=False), flush=True)
        rows += json.loads(table.to_json(orient="records"))
        saved.write_text(json.dumps(rows))
    return pd.DataFrame(rows)


def run_cli(argv=None) -> pd.DataFrame | None:
    """What ``main`` does (load, calibrate, evaluate, save unless ``--no-save``); returns the summary."""
    args = _parser().parse_args(argv)
    import subprocess
    import sys

    import torch

    from .. import results
    from ..paths import cache_dir

    if args.workers < 1 or (args.worker is not None and not 0 <= args.worker < args.workers):
        raise ValueError(f"--workers must be >= 1 and --worker in [0, workers), got {args.workers}, {args.worker}")
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = trigger_grid(args.budgets, args.kinds, args.step_budgets, not args.no_assisted)
    kw = dict(window=args.window, big_span=args.big_span, max_new_tokens=args.max_new_tokens,
              step_window=args.step_window)
    probs = _problems(args.problems, args.source, args.n, args.seed)
    t0 = time.perf_counter()
    if args.worker is not None:  # a child: its share of the problems, into its own logs
        thresholds = json.loads(Path(args.thresholds).read_text())
        small, big = _load(args.small, args.dtype, args.device), _load(args.big, args.dtype, args.device)
        run_eval(probs[args.worker::args.workers], small, big, Path(args.log_dir) / f"w{args.worker}", grid,
                 thresholds, time_budget_s=args.time_budget_s, **kw)
        return None
    small, big = _load(args.small, args.dtype, args.device), _load(args.big, args.dtype, args.device)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    saved = Path(args.log_dir) / "thresholds.json" if args.log_dir else None
    if saved is not None and saved.is_file():  # a later call on the same logs: the same thresholds (a resume)
        thresholds, calib = json.loads(saved.read_text()), {"scores": {}}
        missing = [g["label"] for g in grid if g["method"] == "trigger" and g["label"] not in thresholds]
        if missing:
            raise ValueError(f"{saved} has no threshold for {missing}: another grid wrote these logs")
    else:
        calib = calibrate(small, big, _problems(args.calib_problems, args.source, args.n_calib, args.calib_seed),
                          grid, **kw)
        thresholds = {k: v for k, v in calib.items() if k != "scores"}
    t_calib = time.perf_counter() - t1
    print("thresholds:", json.dumps(thresholds), flush=True)
    tag = f"{args.source}-{args.seed}-{args.max_new_tokens}-{args.window}-{args.big_span}-{args.dtype}-" \
          f"{Path(args.small).stem}-{Path(args.big).stem}-{zlib.crc32(json.dumps(thresholds).encode()):08x}"
    log_dir = Path(args.log_dir) if args.log_dir else cache_dir() / "splitreason" / f"triggers-{tag}"
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "thresholds.json").write_text(json.dumps(thresholds))
    throughput = _throughput(args, small, big, log_dir) if args.latency else None
    if args.workers == 1:
        records = run_eval(probs, small, big, log_dir, grid, thresholds, time_budget_s=args.time_budget_s,
                           progress=True, **kw)
    else:
        del small, big  # the workers load their own copies
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # the workers' own time budget counts from their start: take off what loading and calibration used
        budget = None if args.time_budget_s is None else max(0.0, args.time_budget_s - (time.perf_counter() - t0))
        base = [a for a in (argv if argv is not None else sys.argv[1:])]
        procs = []
        for k in range(args.workers):
            cmd = [sys.executable, "-m", "effllm_lib.offload.trigger_eval", *base, "--worker", str(k),
                   "--thresholds", str(log_dir / "thresholds.json"), "--log-dir", str(log_dir)]
            if budget is not None:
                cmd += ["--time-budget-s", str(budget)]
            procs.append(subprocess.Popen(cmd))
        rcs = [p.wait() for p in procs]
        if any(rcs):
            print(f"warning: worker exit codes {rcs}; summarizing what the logs hold", flush=True)
        records = _collect(probs, grid, [log_dir / f"w{k}" for k in range(args.workers)])
    summary = summarize(records)
    print(summary[["mode", "problems", "pass@1", "ci_lo", "ci_hi", "big_token_pct", "handoffs_per_problem",
                   "wall_s_per_problem"]].round(3).to_string(), flush=True)
    if args.no_save:
        return summary
    params = {k: v for k, v in vars(args).items()
              if k not in ("no_save", "log_dir", "suffix", "worker", "thresholds", "workers")}
    extra = {"problems_run": int(summary.problems.max()), "thresholds": thresholds, "load_s": t_load,
             "calibration_s": t_calib, "eval_s": time.perf_counter() - t1 - t_calib, "workers": args.workers,
             "calibration_windows": {k: len(v) for k, v in calib["scores"].items()},
             "scorer": "strict (answers.strict_score)", "problems_requested": args.n,
             "loadavg_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if throughput is not None:
        from .latency import latency_table, throughput_of

        extra["latency_workers"] = args.workers  # > 1: wall times share the device, not the idle-GPU latency
        lat = latency_table(records, (throughput_of(throughput, "small", "dynamic"),
                                      throughput_of(throughput, "big", "dynamic")),
                            (throughput_of(throughput, "small"), throughput_of(throughput, "big")),
                            chunk_tokens=args.big_span)
        print(lat[["mode", "measured_s", "sequential_s", "pipelined_sim_s", "small_probe_s", "handoffs_per_problem"]]
              .round(3).to_string(), flush=True)
        results.save(throughput, "splitreason", f"throughput{args.suffix}", params=params, scale=args.scale,
                     extra=extra)
        results.save(lat, "splitreason", f"trigger_latency{args.suffix}", params=params, scale=args.scale,
                     extra=extra)
    results.save(summary, "splitreason", f"trigger_modes{args.suffix}", params=params, scale=args.scale, extra=extra)
    # the texts are kept, so a later scorer can re-score every completion
    results.save(records, "splitreason", f"trigger_records{args.suffix}", params=params, scale=args.scale,
                 extra=extra)
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
