"""Zero-shot multiple choice at a scale that can decide "loses < 0.5 points": batched scoring of many BIG-bench
questions and a paired bootstrap of each quantized configuration's accuracy change against the float model.

    python -m effllm_lib.bitmod.zeroshot --model smollm2-135m --gguf smol.gguf --tokenizer tok \
        --tasks-dir TASKS --tasks arithmetic,winowhy,strategyqa --configs float,bitmod4,bitmod3,int_asym4 \
        --batch-size 256 --out OUT

A question is scored as in ``effllm_lib.eval.multiple_choice_accuracy`` (summed log-probability of each answer's
tokens after the BIG-bench prompt; the highest wins) but many answers share one padded forward pass. The
summary (``task_set`` "above_chance") keeps the tasks where the float model is above chance (one-sided binomial
test, p < 0.01, on the float model's own answers; "all" repeats it over every task) and gives, per
configuration, the change in accuracy pooled over those questions with a bootstrap interval that resamples
questions within each task, the same resample for both models (paired).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import eval as E

CLAIM_POINTS = 0.5  # the paper: BitMoD-4 loses < 0.5 points of zero-shot accuracy


def task_files(tasks_dir: str | Path, names: list[str]) -> dict[str, Path]:
    """task name -> task.json under ``tasks_dir``; a folder of subtasks (e.g. ``arithmetic``) gives every
    subtask that has a task.json, named ``arithmetic/<subtask>``."""
    root = Path(tasks_dir)
    out = {}
    for name in names:
        path = root / name
        if (path / "task.json").is_file():
            out[name] = path / "task.json"
            continue
        subs = sorted(p.parent for p in path.glob("*/task.json")) if path.is_dir() else []
        if not subs:
            raise FileNotFoundError(f"no BIG-bench task {name!r} (task.json or subtask folders) under {root}")
        for s in subs:
            out[f"{name}/{s.name}"] = s / "task.json"
    return out


@torch.no_grad()
def score(model, tokenizer, examples: list[E.MCExample], batch_size: int = 64, bos="auto") -> list[list[float]]:
    """Summed log-probability of every answer of every example, answers of many examples batched together
    (sorted by length, right-padded: a causal model's logits at real positions ignore the padding)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    use_bos = E._resolve_bos(tokenizer, bos)
    bos_id = tokenizer.bos_token_id if use_bos else None
    seqs = [(i, j, *E._continuation_ids(tokenizer, ex.prompt, c, bos_id))
            for i, ex in enumerate(examples) for j, c in enumerate(ex.choices)]
    seqs.sort(key=lambda s: len(s[2]))
    out = [[0.0] * len(ex.choices) for ex in examples]
    device = E._device(model)
    model.eval()
    for b0 in range(0, len(seqs), batch_size):
        batch = seqs[b0:b0 + batch_size]
        length = max(len(s[2]) for s in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for r, (_, _, s, _) in enumerate(batch):
            ids[r, :len(s)] = torch.tensor(s)
            mask[r, :len(s)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for r, (i, j, s, n_ctx) in enumerate(batch):
            lp = logits[r, n_ctx - 1:len(s) - 1].float().log_softmax(-1)  # position t predicts token t + 1
            out[i][j] = float(lp.gather(-1, torch.tensor(s[n_ctx:], device=lp.device)[:, None]).sum())
    return out


def correct_flags(examples: list[E.MCExample], logprobs: list[list[float]]) -> list[bool]:
    """Whether the highest-scoring answer (the first of equal ones) is a gold answer."""
    return [max(range(len(lp)), key=lp.__getitem__) in ex.gold for ex, lp in zip(examples, logprobs)]


def _flags(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8) == ord("Y")


def above_chance(df: pd.DataFrame, alpha: float = 0.01, reference: str = "float") -> list[str]:
    """Tasks where the reference model's accuracy is above chance: one-sided binomial test at level ``alpha``
    (normal approximation with continuity correction; every task here has >= 49 questions)."""
    keep = []
    for r in df[df.config == reference].itertuples():
        k, n, p = int(round(r.accuracy * r.n)), int(r.n), float(r.chance)
        z = (k - 0.5 - n * p) / math.sqrt(n * p * (1 - p))
        if 0.5 * math.erfc(z / math.sqrt(2)) < alpha:
            keep.append(r.task)
    return keep


def paired_change(df: pd.DataFrame, config: str, tasks: list[str], reference: str = "float", n_boot: int = 10000,
                  seed: int = 0, level: float = 0.95) -> dict:
    """Accuracy of ``config`` minus ``reference`` in points over the questions of ``tasks`` pooled, with a
    percentile bootstrap interval (questions resampled within each task, the same indices for both models)."""
    if not tasks:
        raise ValueError("no tasks to compare on")
    rng = np.random.default_rng(seed)
    diffs, boots, n, disc = [], np.zeros(n_boot), 0, 0
    by = df.set_index(["config", "task"])
    for t in tasks:
        a, b = _flags(by.loc[(config, t), "correct"]), _flags(by.loc[(reference, t), "correct"])
        if len(a) != len(b):
            raise ValueError(f"{t}: {config} and {reference} scored different questions ({len(a)} vs {len(b)})")
        d = a.astype(float) - b.astype(float)
        diffs.append(d)
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boots += d[idx].sum(1)
        n += len(d)
        disc += int((a != b).sum())
    total = float(np.concatenate(diffs).sum())
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    change, lo, hi = 100 * total / n, 100 * lo / n, 100 * hi / n
    verdict = ("loss < 0.5 pt" if lo > -CLAIM_POINTS else "loss > 0.5 pt" if hi < -CLAIM_POINTS else "undecided")
    return {"config": config, "reference": reference, "change_pp": change, "change_lo": float(lo),
            "change_hi": float(hi), "questions": n, "tasks": len(tasks), "discordant": disc / n,
            "verdict": verdict}


def questions_needed(discordant: float, half_width_pp: float = CLAIM_POINTS, z: float = 1.96) -> int:
    """Questions for a paired interval of +-half_width (normal approximation, change near 0):
    n = discordant * (z / half_width)^2."""
    return math.ceil(discordant * (z / (half_width_pp / 100)) ** 2)


def main(argv=None) -> int:
    from .. import results
    from .accuracy import _load_model
    from .quantize import BitMoDConfig, quantize_

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="name recorded in the results (required unless --summarize)")
    ap.add_argument("--gguf")
    ap.add_argument("--model-dir")
    ap.add_argument("--tokenizer")
    ap.add_argument("--tasks-dir", help="folder of BIG-bench <task>/task.json (or <task>/<sub>/...)")
    ap.add_argument("--tasks", help="comma-separated task folders (a folder of subtasks = all)")
    ap.add_argument("--configs", default="float,bitmod4,bitmod3,int_asym4",
                    help="float and/or <dtype><bits> labels (round to nearest, group 128)")
    ap.add_argument("--max-examples", type=int, default=None, help="per task (seeded subset)")
    ap.add_argument("--batch-size", type=int, default=64, help="answers per forward pass")
    ap.add_argument("--n-boot", type=int, default=10000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="")
    ap.add_argument("--scale", choices=("ci", "full"), default="full")
    ap.add_argument("--summarize", nargs="+", metavar="ZEROSHOT_CSV", help="only summarize these files")
    args = ap.parse_args(argv)
    out, tag = Path(args.out), (f"_{args.tag}" if args.tag else "")
    if not args.summarize:
        if not (args.model and args.tasks_dir and args.tasks and (args.gguf or args.model_dir)):
            ap.error("--model, --tasks-dir, --tasks and one of --gguf / --model-dir are required (or --summarize)")
        files = task_files(args.tasks_dir, [t for t in args.tasks.split(",") if t])
        cfgs = []
        for label in args.configs.split(","):
            if label == "float":
                cfgs.append(None)
                continue
            dtype, bits = label.rstrip("0123456789"), label[len(label.rstrip("0123456789")):]
            if not bits:
                ap.error(f"config {label!r}: expected float or <dtype><bits>, e.g. bitmod4")
            cfgs.append(BitMoDConfig(bits=int(bits), dtype=dtype))
        tasks = {t: E.bigbench_multiple_choice(json.loads(p.read_text()), args.max_examples, seed=0)
                 for t, p in files.items()}
        base, tok = _load_model(argparse.Namespace(model_dir=args.model_dir, gguf=args.gguf, tokenizer=args.tokenizer,
                                                   device=args.device))
        rows = []
        params = {k: v for k, v in vars(args).items() if k not in ("out", "summarize")}
        for cfg in cfgs:
            import copy

            model = base if cfg is None else copy.deepcopy(base)
            report = None if cfg is None else quantize_(model, cfg)
            for t, examples in tasks.items():
                start = time.perf_counter()
                flags = correct_flags(examples, score(model, tok, examples, args.batch_size))
                chance = sum(len(ex.gold) / len(ex.choices) for ex in examples) / len(examples)
                rows.append({"model": args.model, "task": t, "config": "float" if cfg is None else cfg.label,
                             "dtype": "float" if cfg is None else cfg.dtype, "bits": 16 if cfg is None else cfg.bits,
                             "bits_per_weight": 16.0 if cfg is None else report.bits_per_weight,
                             "accuracy": sum(flags) / len(flags), "n": len(flags), "chance": chance,
                             "correct": "".join("Y" if c else "N" for c in flags),
                             "eval_seconds": time.perf_counter() - start})
                print(f"{rows[-1]['config']:>10} {t:>36} acc {rows[-1]['accuracy']:.3f} (chance {chance:.3f}, "
                      f"n {len(flags)}, {rows[-1]['eval_seconds']:.1f} s)", flush=True)
            results.save(pd.DataFrame(rows), "bitmod", f"zeroshot_{args.model}{tag}", params=params, scale=args.scale,
                         path=out / f"zeroshot_{args.model}{tag}.csv")
            if cfg is not None:
                del model
        frames = [pd.DataFrame(rows)]
    else:
        frames = [results.read(p) for p in args.summarize]
    df = pd.concat(frames, ignore_index=True).drop_duplicates(["model", "task", "config"])
    if "float" not in set(df.config):
        if args.summarize:
            raise ValueError("the summary compares against the float model: include a file with its rows")
        print("no float rows in this run: summarize it together with one that has them (--summarize)", flush=True)
        return 0
    keep = above_chance(df)
    sets = {"above_chance": keep, "all": sorted(df.task.unique())}  # the claim's set, and every task for context
    summary = pd.DataFrame([{"task_set": name, **paired_change(df, c, tasks, n_boot=args.n_boot)}
                            for name, tasks in sets.items() if tasks for c in df.config.unique() if c != "float"])
    summary["needed_for_half_point"] = [questions_needed(d) for d in summary.discordant]
    name = df.model.iloc[0]
    results.save(summary, "bitmod", f"zeroshot_paired_{name}{tag}", scale=args.scale,
                 params={"tasks_above_chance": keep, "n_boot": args.n_boot,
                         "files": [Path(p).name for p in args.summarize or []]},
                 path=out / f"zeroshot_paired_{name}{tag}.csv")
    print(summary.to_string(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
