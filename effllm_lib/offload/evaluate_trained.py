"""Accuracy of a (trained) small model on held-out gsm_symbolic templates: alone, or offloading through the controller.

``alone``: batched greedy generation with transformers (left padding; stops on every end-of-sequence id of the
tokenizer and the generation config). ``tags``: the controller's tags mode with the big model (one problem at a
time), which also gives the offload fraction. Both append one JSON line per problem to a log and skip what the
log has (``problems.read_log`` / ``append_record``), so a run cut by a time limit goes on where it stopped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from .problems import append_record, build_prompt, pass_at_1, read_log
from .sft_data import as_problems, gsm_items

MODES = ("alone", "tags")


def _stop_ids(model, tok) -> list[int]:
    ids = set()
    for src in (tok.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return sorted(ids)


@torch.inference_mode()
def generate_alone(model, tok, prompts: list[str], max_new_tokens: int) -> list[dict]:
    """Greedy completions of a batch of chat-formatted prompts (left padded)."""
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    stop = _stop_ids(model, tok)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                         pad_token_id=tok.pad_token_id)
    rows = []
    for seq in out[:, enc["input_ids"].shape[1]:].tolist():
        n = next((k for k, t in enumerate(seq) if t in stop), None)
        kept = seq if n is None else seq[:n]
        rows.append({"text": tok.decode(kept, skip_special_tokens=False), "tokens": len(kept),
                     "finished": n is not None})
    return rows


def evaluate_model(model, tok, log: str | os.PathLike, *, n: int = 1000, seed: int = 0, mode: str = "alone",
                   big=None, tag_hint: bool = False, max_new_tokens: int = 512, batch_size: int = 32,
                   controller_kw: dict | None = None, progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """(records, pass@1 summary) on ``n`` held-out items; ``big`` = (model, tokenizer) for mode ``tags``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "tags" and big is None:
        raise ValueError("mode 'tags' needs the big model")
    problems = as_problems(gsm_items("held_out", n, seed=seed))
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    done = {r["problem_id"] for r in read_log(log)}
    todo = [p for p in problems if p.id not in done]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc=f"eval {mode}", disable=not progress)
    if mode == "alone":
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            outs = generate_alone(model, tok, [build_prompt(tok, p.question, tag_hint=tag_hint) for p in chunk],
                                  max_new_tokens)
            for p, o in zip(chunk, outs):
                append_record(log, {**o, "problem_id": p.id, "source": p.source, "sample": 0, "gold": p.answer,
                                    "correct": p.score(o["text"]), "big_fraction": 0.0})
            bar.update(len(chunk))
    else:
        from .controller import Controller

        ctl = Controller((model, tok), big, max_new_tokens=max_new_tokens, **(controller_kw or {}))
        for p in todo:
            g = ctl.generate(build_prompt(tok, p.question, tag_hint=tag_hint), build_prompt(big[1], p.question),
                             mode="tags")
            append_record(log, {"text": g.text, **g.summary(), "problem_id": p.id, "source": p.source, "sample": 0,
                                "gold": p.answer, "correct": p.score(g.text)})
            bar.update(1)
    bar.close()
    wanted = {p.id for p in problems}
    records = pd.DataFrame([r for r in read_log(log) if r["problem_id"] in wanted])
    summary = pass_at_1(records)
    summary["big_fraction"] = float(records["big_fraction"].mean())
    return records, summary


def paired_change(before: pd.DataFrame, after: pd.DataFrame, seed: int = 0) -> dict:
    """Accuracy change after - before on the same problems (``*_records`` frames of two evaluations), with a
    paired bootstrap interval; problems present in only one of them are an error (the change would not be
    paired)."""
    from ..stats import paired_difference_ci

    a = before.set_index("problem_id")["correct"].astype(float)
    b = after.set_index("problem_id")["correct"].astype(float)
    if set(a.index) != set(b.index) or a.index.has_duplicates:
        raise ValueError(f"the two evaluations must score the same problems once each: {len(a)} vs {len(b)}, "
                         f"{len(set(a.index) ^ set(b.index))} not shared")
    b = b.loc[a.index]
    diff, lo, hi = paired_difference_ci(b.to_numpy(), a.to_numpy(), seed=seed)
    return {"before": float(a.mean()), "after": float(b.mean()), "change": diff, "lo": lo, "hi": hi,
            "problems": len(a)}
