"""The controller's modes over math problems: accounting, pass@1, measured latency vs the simulator, and which
of the paper's claims this machine cannot measure (and why).

Modes compared (``mode_grid``): the small model alone, the big model alone, random switching at matched offload
fractions (the random mode picks the big model for a chunk with p = 1 / (ratio + 1), so a target fraction f needs
ratio = 1/f - 1), and prompted tags (the small model is told to use ``<bigmodel>`` tags; it was never trained to,
which is what part 2's SFT+GRPO adds).

Latency: each record carries its token counts per model and phase; ``predict_latency`` turns them into seconds
with measured throughputs, both as the controller runs them here (one model at a time: every prefill and decode
in sequence) and as the paper's pipelined simulator would run them (``simulator.pipelined_time``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from .controller import Controller
from .problems import SOURCES, Problem, build_prompt, evaluate, pass_at_1
from .simulator import Throughput, big_only_time, pipelined_time

MATCHED_OFFLOAD = (0.05, 0.10, 0.20)


def switch_ratio_for(offload: float) -> float:
    """The random mode's ``switch_ratio`` whose expected big-token fraction is ``offload``."""
    if not isinstance(offload, (int, float)) or not 0.0 < offload <= 1.0:
        raise ValueError(f"offload is a fraction of tokens in (0, 1], got {offload!r}")
    return 1.0 / offload - 1.0


def mode_grid(offloads=MATCHED_OFFLOAD) -> list[dict]:
    """The modes to compare, each a dict with a ``label``, the controller ``mode`` and its knobs."""
    grid = [{"label": "small only", "mode": "small"}, {"label": "big only", "mode": "big"}]
    for f in offloads:
        grid.append({"label": f"random {round(100 * f):g}%", "mode": "random", "switch_ratio": switch_ratio_for(f),
                     "target_offload": float(f)})
    grid.append({"label": "prompted tags", "mode": "tags"})
    return grid


def make_generate(small, big, spec: dict, **controller_kwargs) -> Callable[[Problem, int], dict]:
    """``generate(problem, sample)`` for ``problems.evaluate``: one completion in the mode ``spec`` names, with the
    controller's accounting and both prompts' lengths in tokens."""
    if not isinstance(spec, dict) or "mode" not in spec or "label" not in spec:
        raise ValueError(f"spec must be a dict with 'label' and 'mode' (see mode_grid), got {spec!r}")
    seed = controller_kwargs.pop("seed", 0)
    small_tok, big_tok = small[1], big[1]

    def generate(problem: Problem, sample: int) -> dict:
        ctrl = Controller(small, big, seed=seed + sample, switch_ratio=spec.get("switch_ratio", 19),
                          **controller_kwargs)
        small_prompt = build_prompt(small_tok, problem.question, tag_hint=spec["mode"] == "tags")
        big_prompt = build_prompt(big_tok, problem.question)
        gen = ctrl.generate(small_prompt, big_prompt, spec["mode"])
        return {"text": gen.text, **gen.summary(), "label": spec["label"],
                "small_prompt_tokens": len(small_tok(small_prompt, add_special_tokens=False)["input_ids"]),
                "big_prompt_tokens": len(big_tok(big_prompt, add_special_tokens=False)["input_ids"]),
                "generated_tokens": gen.small.kept_tokens + gen.big.kept_tokens}

    return generate


def log_name(label: str) -> str:
    """The JSON-lines log file of a mode, from its label."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_") + ".jsonl"


def run_round_robin(problems: list[Problem], gens: list[tuple[dict, object, Path]], *,
                    time_budget_s: float | None = None, progress: bool = False) -> list[tuple[dict, pd.DataFrame]]:
    """Each problem through every (spec, generate, log) in turn, so every mode sees the same problems; with
    ``time_budget_s`` no new problem starts once that many seconds have passed (the first always runs; a rerun
    continues from the logs). Returns (spec, records of the problems done) per mode."""
    import time

    from tqdm.auto import tqdm

    t0, done = time.perf_counter(), []
    for p in tqdm(problems, desc="problems", disable=not progress):
        if time_budget_s is not None and done and time.perf_counter() - t0 > time_budget_s:
            break
        for spec, gen, log in gens:
            evaluate([p], gen, log, desc=spec["label"], progress=False)
        done.append(p.id)
    wanted = set(done)
    return [(spec, evaluate([p for p in problems if p.id in wanted], gen, log, progress=False))
            for spec, gen, log in gens]


def run_modes(problems: list[Problem], small, big, log_dir: str | Path, *, grid: list[dict] | None = None,
              time_budget_s: float | None = None, progress: bool = False, **controller_kwargs) -> pd.DataFrame:
    """Every mode of ``grid`` over ``problems`` (one sample each), resumable: one JSON-lines log per mode in
    ``log_dir``. Problems are taken one at a time through all modes, so every mode sees the same problems; with
    ``time_budget_s`` no new problem starts once that many seconds have passed (the first always runs; a rerun
    continues from the logs).
    Returns all records, one row per (mode, problem)."""
    grid = mode_grid() if grid is None else grid
    if not problems:
        raise ValueError("run_modes needs at least one problem")
    gens = [(spec, make_generate(small, big, spec, **dict(controller_kwargs)), Path(log_dir) / log_name(spec["label"]))
            for spec in grid]
    frames = [df for _, df in run_round_robin(problems, gens, time_budget_s=time_budget_s, progress=progress)]
    return pd.concat(frames, ignore_index=True)


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """One row per mode: pass@1 with a 95% bootstrap interval, the big-token fraction (over all tokens kept),
    tokens per model and phase, and wall time per phase (all summed over problems)."""
    need = {"label", "problem_id", "correct", "small_kept_tokens", "big_kept_tokens", "wall_s"}
    if records.empty or not need <= set(records.columns):
        raise ValueError(f"records need columns {sorted(need)} (from run_modes)")
    rows = []
    for label, df in records.groupby("label", sort=False):
        p = pass_at_1(df)
        kept = df.small_kept_tokens.sum() + df.big_kept_tokens.sum()
        row = {"mode": label, "problems": p["problems"], "pass@1": p["pass@1"], "ci_lo": p["lo"], "ci_hi": p["hi"],
               "big_token_pct": 100.0 * df.big_kept_tokens.sum() / kept if kept else 0.0,
               "finished_pct": 100.0 * df.finished.mean(), "wall_s": df.wall_s.sum()}
        for m in ("small", "big"):
            for k in ("prefill_tokens", "decode_tokens", "rolled_back", "probe_prefill_tokens", "probe_decode_tokens",
                      "prefill_s", "decode_s", "probe_s"):
                row[f"{m}_{k}"] = df[f"{m}_{k}"].sum()
        rows.append(row)
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PairThroughput:
    small: Throughput
    big: Throughput


def predict_latency(record: dict, tp: PairThroughput, chunk_tokens: int = 64) -> dict:
    """Seconds one record should take from its token counts and the measured throughputs.

    ``sequential_s``: what this controller does, one model at a time, every prefill and decode in turn (probe
    batches counted as small-model prefill, their lookahead as decode). ``pipelined_s``: the paper's simulator for
    the same prompt, generated length and big-token fraction (the big model alone for ``big only``; the small model
    alone for ``small only``, which the simulator would otherwise pipeline with an idle big model)."""
    s, b = tp.small, tp.big
    seq = (record["small_prefill_tokens"] + record["small_probe_prefill_tokens"]) / s.prefill \
        + (record["small_decode_tokens"] + record["small_probe_decode_tokens"]) / s.decode \
        + record["big_prefill_tokens"] / b.prefill + record["big_decode_tokens"] / b.decode
    n = max(1, int(record["generated_tokens"]))
    prompt = int(record["small_prompt_tokens" if record["mode"] == "small" else "big_prompt_tokens"])
    if record["mode"] == "big":
        pipe = big_only_time(b, prompt, n)
    elif record["mode"] == "small":
        pipe = prompt / s.prefill + n / s.decode
    else:
        frac = record["big_kept_tokens"] / n if n else 0.0
        pipe = pipelined_time(s, b, min(1.0, frac), prefill_tokens=prompt, decode_tokens=n,
                              chunk_tokens=min(chunk_tokens, n))["total_s"]
    return {"measured_s": float(record["wall_s"]), "sequential_s": seq, "pipelined_s": pipe}


def latency_table(records: pd.DataFrame, tp: PairThroughput, chunk_tokens: int = 64) -> pd.DataFrame:
    """Per mode: measured wall time vs the sequential and pipelined predictions, summed over problems."""
    rows = [{"mode": r["label"], **predict_latency(r, tp, chunk_tokens)} for r in records.to_dict("records")]
    out = pd.DataFrame(rows).groupby("mode", sort=False).sum().reset_index()
    out["measured_over_sequential"] = out.measured_s / out.sequential_s
    out["speedup_pipelined_vs_measured"] = out.measured_s / out.pipelined_s
    return out


# ------------------------------------------------------------------------------------- what we cannot measure
# The paper's models by size (Hugging Face names); SplitReason's own small model is the 1.5B after SFT+GRPO.
PAPER_MODELS = {"1.5B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "8B": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
                "14B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "32B": "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B",
                "70B": "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"}
SPLITREASON_CHECKPOINT = "the authors' SFT+GRPO-trained R1-Distill-Qwen-1.5B (SplitReason small model)"
PAPER_DATA = "AIME24 (30 problems)"
PAPER_HARDWARE = "A6000"
# Claims our own pair can test once part 2 (SFT + GRPO of the small model) exists: trends, not absolute numbers.
# measured with our pair as stand-ins (effllm_lib.standins), so not declared unreproducible here
STAND_IN_CLAIMS = {"acc_random_5p05", "acc_random_10", "time_splitr32_learned_5_simulated"}
PART2_CLAIMS = {"gain_splitr32_learned_1p35", "gain_splitr32_learned_5", "speedup_measured_splitr32",
                "offload_after_grpo"}


@dataclass(frozen=True)
class Requirement:
    """What one claim needs: the paper's models (sizes), its trained checkpoint, its data, its GPUs."""

    models: tuple[str, ...] = ()
    trained_checkpoint: bool = False
    data: str | None = PAPER_DATA
    hardware: str | None = None


def claim_requirements(claim_id: str) -> Requirement:
    """Read what a SplitReason claim needs from its id (``acc_``/``time_`` + the models and offload it names)."""
    m = re.match(r"(acc|time)_(small_1p5b|big_(\d+)b|splitr(\d+)(?:_learned_\w+)?|random_\w+)$", claim_id)
    if not m:
        raise ValueError(f"{claim_id!r} is not an accuracy/eval-time claim of SplitReason")
    kind, what = m.group(1), m.group(2)
    hw = PAPER_HARDWARE if kind == "time" else None
    if what == "small_1p5b":
        return Requirement(("1.5B",), hardware=hw)
    if m.group(3):
        return Requirement((f"{m.group(3)}B",), hardware=hw)
    if m.group(4):
        return Requirement(("1.5B", f"{m.group(4)}B"), trained_checkpoint=True, hardware=hw)
    return Requirement(("1.5B", "32B"), hardware=hw)  # random offload between the 1.5B and the 32B


def missing_for(req: Requirement, *, available_models: set[str], sources: tuple[str, ...],
                gpu: str | None) -> list[str]:
    """The parts of ``req`` this setup lacks, each as a phrase."""
    missing = [f"model {PAPER_MODELS[s]}" for s in req.models if PAPER_MODELS[s] not in available_models]
    if req.trained_checkpoint:
        missing.append(SPLITREASON_CHECKPOINT)
    if req.data and not any("aime" in s.lower() for s in sources):
        missing.append(f"data {req.data} (packaged problem sources: {', '.join(sources)})")
    if req.hardware and (gpu is None or req.hardware.lower() not in gpu.lower()):
        missing.append(f"hardware: {req.hardware} GPUs with vLLM, 8 concurrent requests (here: {gpu or 'no GPU'})")
    return missing


def unreproducible_claims(claims: pd.DataFrame, *, available_models: set[str] | None = None,
                          sources: tuple[str, ...] = SOURCES, gpu: str | None = "detect") -> pd.DataFrame:
    """``claim_id, ours, status, reason`` for every accuracy/eval-time claim whose requirements this setup lacks
    (models from ``models.MODELS``, problem sources, the GPU ``results.hardware()`` sees). Claims part 2 can test
    with our pair, and the simulator's claims (measured by the simulator notebook), are left out."""
    if available_models is None:
        from ..models import MODELS

        available_models = {spec.hf_name for spec in MODELS.values()}
    if gpu == "detect":
        from ..results import hardware

        gpu = hardware().get("gpu")
    rows = []
    for cid in claims["claim_id"]:
        if cid in PART2_CLAIMS or cid in STAND_IN_CLAIMS or not re.match(r"(acc|time)_", cid):
            continue
        missing = missing_for(claim_requirements(cid), available_models=available_models, sources=sources, gpu=gpu)
        if missing:
            rows.append({"claim_id": cid, "ours": math.nan, "status": "not_reproducible",
                         "reason": "missing " + "; ".join(missing)})
    return pd.DataFrame(rows, columns=["claim_id", "ours", "status", "reason"])
