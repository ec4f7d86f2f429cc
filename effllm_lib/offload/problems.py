"""Math problems with exact answers, and a resumable pass@1 evaluation harness.

Sources (no GSM8K / MATH / AIME package is installable here):

* ``gsm_symbolic``: reasoning-gym's 100 GSM8K-test-derived templates, drawn with a fixed seed (integer answers).
* ``elementary_math_qa``: BIG-bench MathQA word problems (gold is one of five choices, e.g. ``"240 %"``,
  ``"18 days"``, ``"3 : 10"``).
* ``multistep_arithmetic``: BIG-bench integer expressions.

Every source is scored with the strict check of ``answers.py`` (``answers.strict_scorer``): the completion's final
boxed (or declared) answer must be a number equal to the gold. reasoning-gym's own ``score_answer`` takes the
first number it finds (``\\boxed{(3 + 4)}`` reads as 3) and math_verify evaluates expressions (a restated
question gets the credit), so neither decides here.

``evaluate`` runs ``generate(problem, sample)`` for k samples per problem, appends one JSON line per sample to a
results log (one ``os.write`` per line, fsynced: a crash loses at most the sample being written), skips what the
log already has when run again, and shows a progress bar. ``pass_at_1`` gives the mean over problems of the
fraction of correct samples, with a bootstrap confidence interval over problems.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from .answers import last_boxed, strict_scorer

SOURCES = ("gsm_symbolic", "elementary_math_qa", "multistep_arithmetic")
ANSWER_INSTRUCTION = "Put your final answer within \\boxed{}."
TAG_HINT = "You always use <bigmodel>...</bigmodel> to mark parts of the reasoning process that are important."


@dataclass
class Problem:
    id: str
    source: str
    question: str
    answer: str
    scorer: Callable[[str], float] = field(repr=False, default=None)

    def score(self, completion: str) -> float:
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        return float(self.scorer(completion))


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (balanced braces), or None."""
    return last_boxed(text)


def load_problems(source: str, n: int, seed: int = 0) -> list[Problem]:
    """``n`` problems of one source, the same ones for the same seed."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if source == "gsm_symbolic":
        try:
            import reasoning_gym
        except ImportError as exc:
            raise RuntimeError("gsm_symbolic needs reasoning-gym: pip install reasoning-gym==0.1.25") from exc
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)
        return [Problem(f"gsm_symbolic/{seed}/{i}", source, entry["question"], str(entry["answer"]),
                        strict_scorer(str(entry["answer"]))) for i, entry in enumerate(ds)]
    from .. import assets

    rows = assets.elementary_math_qa("ci") if source == "elementary_math_qa" else assets.multistep_arithmetic("ci")
    if n > len(rows):
        rows = assets.elementary_math_qa("full") if source == "elementary_math_qa" \
            else assets.multistep_arithmetic("full")
    if n > len(rows):
        raise ValueError(f"{source} has {len(rows)} problems, asked for {n}")
    order = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [Problem(f"{source}/{int(i)}", source, rows[i]["question"], rows[i]["answer"],
                    strict_scorer(rows[i]["answer"])) for i in order]


def build_prompt(tokenizer, question: str, *, tag_hint: bool = False) -> str:
    """The user turn (question, the boxed-answer instruction, optionally SplitReason's tag hint) in the
    model's chat template; plain text for a tokenizer without one."""
    content = f"{question.strip()}\n{ANSWER_INSTRUCTION}" + (f" {TAG_HINT}" if tag_hint else "")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
    return content + "\n"


# --------------------------------------------------------------------------------------------- the log
def read_log(path: str | os.PathLike) -> list[dict]:
    """Records of a results log; a last line cut short by a crash is dropped (and trimmed from the file)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete, _, partial = data.rpartition(b"\n")
    if partial:  # no trailing newline: the last write did not finish
        with open(path, "r+b") as fh:
            fh.truncate(len(complete) + (1 if complete else 0))
    records = []
    for n, line in enumerate(complete.decode().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {n} is not JSON ({exc})") from None
    return records


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line with a single write, then fsync."""
    line = (json.dumps(record, sort_keys=True, default=float) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def evaluate(problems: list[Problem], generate: Callable[[Problem, int], dict], log: str | os.PathLike, *,
             k: int = 1, desc: str = "eval", progress: bool = True) -> pd.DataFrame:
    """k samples per problem; ``generate(problem, sample)`` returns a dict with ``text`` (plus any stats).
    Resumes from ``log``; returns every record as a DataFrame."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique")
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["problem_id"], r["sample"]) for r in read_log(log)}
    todo = [(p, s) for p in problems for s in range(k) if (p.id, s) not in done]
    from tqdm.auto import tqdm

    for p, s in tqdm(todo, desc=desc, disable=not progress):
        out = generate(p, s)
        if not isinstance(out, dict) or "text" not in out:
            raise TypeError("generate(problem, sample) must return a dict with a 'text' entry")
        append_record(log, {**out, "problem_id": p.id, "source": p.source, "sample": s, "gold": p.answer,
                            "correct": p.score(out["text"])})
    wanted = set(ids)
    return pd.DataFrame([r for r in read_log(log) if r["problem_id"] in wanted])


def pass_at_1(records: pd.DataFrame, *, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over problems of the fraction of correct samples, with a percentile bootstrap interval over
    problems (the problems, not the samples, are the independent units)."""
    if records.empty or not {"problem_id", "correct"} <= set(records.columns):
        raise ValueError("records need problem_id and correct columns and at least one row")
    per_problem = records.groupby("problem_id")["correct"].mean().to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    boot = per_problem[rng.integers(0, len(per_problem), size=(n_boot, len(per_problem)))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return {"pass@1": float(per_problem.mean()), "lo": float(np.quantile(boot, alpha)),
            "hi": float(np.quantile(boot, 1 - alpha)), "problems": len(per_problem),
            "samples": int(len(records))}
