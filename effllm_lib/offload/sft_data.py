"""Supervised data to bring the small model to competence: gsm_symbolic chain-of-thought traces, split by template.

Our small model (SmolLM2-135M) solves about 0% of gsm_symbolic alone, and a few percent of offload cannot rescue
a model that cannot do the easy steps; so before it learns *where* to ask for help it is taught the task itself,
on reasoning-gym's own reference solutions (``metadata["answer_cot"]``: one line per step, ending ``#### <answer>``).

* **Template split.** reasoning-gym draws each item from one of 85 usable templates (``tasks_ok``); the template
  index of item ``i`` is ``dataset.task_indices[i]``. A fixed, seeded third of the templates is held out
  (``HELD_OUT_TEMPLATES``): training items come only from the others, evaluation items only from these, so no
  held-out problem type is ever seen in training (different numbers of one template would leak its solution).
* **Verified traces.** A trace is kept only if its last step's result equals the gold answer (the ``####`` line
  agrees and the final boxed answer scores 1 with the accuracy reward), so a template bug never teaches a wrong
  sum.
* **Format.** The completion is SplitReason's scaffold, ``<think>\\n<steps>\\n</think>\\n<answer>\\n\\boxed{X}\\n
  </answer>``, which the format and tag-count rewards of GRPO look for. The prompt is the evaluation's
  (``problems.build_prompt``: question + boxed-answer instruction, optionally the tag hint) in the small model's
  chat template; the completion is what the template puts after the generation prompt (so it ends with the
  template's end-of-turn), and the loss is on the completion only (prompt labels are -100).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .problems import Problem, build_prompt

SPLITS = ("train", "held_out")
HELD_OUT_FRACTION = 1 / 3
SPLIT_SEED = 20250423  # fixed once; changing it changes which templates the evaluation holds out
IGNORE_INDEX = -100
# template_split()["held_out"], recorded so a machine without reasoning-gym can check exported items (a test
# keeps the two equal)
HELD_OUT = (0, 1, 4, 5, 7, 9, 10, 11, 14, 16, 24, 26, 36, 40, 41, 44, 45, 46, 51, 55, 56, 67, 70, 71, 78, 88, 94, 95)  # label of a token that carries no loss (the prompt)


def _gsm():
    try:
        import reasoning_gym
        from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok
    except ImportError as exc:
        raise RuntimeError("gsm_symbolic needs reasoning-gym: pip install reasoning-gym==0.1.25") from exc
    return reasoning_gym, tuple(sorted(tasks_ok))


def templates() -> tuple[int, ...]:
    """The usable gsm_symbolic template ids (reasoning-gym's ``tasks_ok``)."""
    return _gsm()[1]


def template_split() -> dict[str, tuple[int, ...]]:
    """{"train": ids, "held_out": ids}: a fixed seeded third of the templates is held out for evaluation."""
    ids = list(templates())
    held = sorted(random.Random(SPLIT_SEED).sample(ids, round(len(ids) * HELD_OUT_FRACTION)))
    return {"train": tuple(t for t in ids if t not in held), "held_out": tuple(held)}


def held_out_templates() -> tuple[int, ...]:
    """The templates the evaluation holds out (never in training data)."""
    return template_split()["held_out"]


@dataclass
class Trace:
    """One gsm_symbolic item with its template and verified reference steps."""

    id: str
    template: int
    question: str
    answer: str
    steps: str  # the reference solution, ``####`` line removed

    def completion(self, steps: str | None = None) -> str:
        """The scaffolded completion; ``steps`` replaces the reference steps (e.g. with tags inserted)."""
        steps = self.steps if steps is None else steps
        return f"<think>\n{steps}\n</think>\n<answer>\n\\boxed{{{self.answer}}}\n</answer>"


_FINAL = re.compile(r"^####\s*(.+?)\s*$", re.MULTILINE)


def _verified_steps(cot: str, answer: str) -> str | None:
    """The steps of a reference solution whose ``####`` line equals the gold answer, else None."""
    m = _FINAL.search(cot)
    if m is None or m.group(1).replace(",", "") != answer.replace(",", ""):
        return None
    steps = cot[:m.start()].strip()
    return steps or None


def gsm_items(split: str, n: int, seed: int = 0) -> list[Trace]:
    """``n`` gsm_symbolic items from the templates of ``split``, the same ones for the same seed.

    Items come from reasoning-gym's own dataset (seed ``seed``), skipping those whose template is in the other
    split and those whose reference trace does not verify. Deterministic in (split, n, seed)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    exported = os.environ.get(ITEMS_DIR_ENV)
    if exported and (Path(exported) / items_file_name(split, n, seed)).is_file():
        return read_items(Path(exported) / items_file_name(split, n, seed))
    reasoning_gym, _ = _gsm()
    allowed = set(template_split()[split])
    out: list[Trace] = []
    size = 4 * n + 64  # about 2/3 (train) or 1/3 (held out) of the draws qualify; grow if not enough
    while True:
        ds = reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed)
        out = []
        for i in range(size):
            t = ds.task_indices[i]
            if t not in allowed:
                continue
            entry = ds[i]
            answer = str(entry["answer"])
            steps = _verified_steps(entry["metadata"]["answer_cot"], answer)
            if steps is None:
                continue
            out.append(Trace(f"gsm_symbolic/{split}/{seed}/{i}", t, entry["question"], answer, steps))
            if len(out) == n:
                return out
        size *= 2


ITEMS_DIR_ENV = "EFFLLM_GSM_ITEMS_DIR"  # a folder of exported items: the GPU machine then needs no reasoning-gym


def items_file_name(split: str, n: int, seed: int) -> str:
    return f"gsm_{split}_n{n}_seed{seed}.jsonl"


def export_items(split: str, n: int, seed: int, folder: str | os.PathLike) -> Path:
    """Write ``gsm_items(split, n, seed)`` as JSON lines into ``folder``; ``gsm_items`` reads it back (instead of
    drawing from reasoning-gym) when ``$EFFLLM_GSM_ITEMS_DIR`` names that folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / items_file_name(split, n, seed)
    path.write_text("".join(json.dumps(asdict(t)) + "\n" for t in gsm_items(split, n, seed)))
    return path


def read_items(path: Path) -> list[Trace]:
    items = [Trace(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    held = set(HELD_OUT)
    split = "held_out" if "_held_out_" in path.name else "train"
    if any((t.template in held) != (split == "held_out") for t in items):
        raise ValueError(f"{path}: items from the other split's templates (a stale or edited export)")
    return items


def _accuracy(completion: str, gold: str) -> float:
    # the project's accuracy reward (rewards.py); the strict scorer of the evaluation issue replaces it there
    from .rewards import accuracy_reward

    return accuracy_reward(completion, gold) or 0.0


def as_problems(items: list[Trace]) -> list[Problem]:
    """The evaluation harness's problems (``problems.evaluate``) for these items, scored by the accuracy reward."""
    return [Problem(t.id, "gsm_symbolic", t.question, t.answer, lambda c, g=t.answer: _accuracy(c, g))
            for t in items]


# ------------------------------------------------------------------------------------------ chat formatting
def prompt_and_completion(tokenizer, question: str, completion: str, *, tag_hint: bool = False) -> tuple[str, str]:
    """(prompt text, completion text) in the tokenizer's chat template. The prompt is the evaluation's
    (``build_prompt``); the completion is what the template writes after it for an assistant turn holding
    ``completion`` (its end-of-turn included). Without a chat template: plain text, completion + eos."""
    prompt = build_prompt(tokenizer, question, tag_hint=tag_hint)
    if not getattr(tokenizer, "chat_template", None):
        eos = getattr(tokenizer, "eos_token", None) or ""
        return prompt, completion + eos
    content = prompt_user_content(question, tag_hint)
    full = tokenizer.apply_chat_template([{"role": "user", "content": content},
                                          {"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt):
        # a template that rewrites earlier turns once an assistant turn follows (e.g. strips reasoning):
        # the completion would not be what the model is asked to continue at evaluation
        raise ValueError("the chat template renders the conversation with a different prefix than the "
                         "generation prompt; cannot split it into prompt and completion")
    tail = full[len(prompt):]
    at = tail.find(completion)
    if at == -1:
        raise ValueError("the chat template altered the assistant's text (e.g. stripped whitespace or tags)")
    # keep the template's text up to its end-of-turn token: what follows (a newline) is never generated
    rest = tail[at + len(completion):]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos in rest:
        rest = rest[:rest.index(eos) + len(eos)]
    return prompt, tail[:at] + completion + rest


def prompt_user_content(question: str, tag_hint: bool) -> str:
    from .problems import ANSWER_INSTRUCTION, TAG_HINT

    return f"{question.strip()}\n{ANSWER_INSTRUCTION}" + (f" {TAG_HINT}" if tag_hint else "")


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int | None = None) -> dict:
    """input_ids = prompt ids + completion ids (each tokenized alone, as at generation time), labels = -100 on
    the prompt. An example longer than ``max_length`` is an error, not silently cut (a cut completion would
    teach the model to stop before its answer)."""
    p = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if not c:
        raise ValueError("empty completion")
    ids = p + c
    if max_length is not None and len(ids) > max_length:
        raise ValueError(f"example of {len(ids)} tokens exceeds max_length={max_length}")
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORE_INDEX] * len(p) + c}


def sft_examples(tokenizer, items: list[Trace], *, completions: list[str] | None = None, tag_hint: bool = False,
                 max_length: int | None = None) -> list[dict]:
    """Tokenized examples (input_ids, attention_mask, labels) for ``items``; ``completions`` overrides the
    reference completions (e.g. the annotated ones with ``<bigmodel>`` tags)."""
    if completions is not None and len(completions) != len(items):
        raise ValueError(f"{len(completions)} completions for {len(items)} items")
    out = []
    for k, t in enumerate(items):
        comp = t.completion() if completions is None else completions[k]
        prompt, completion = prompt_and_completion(tokenizer, t.question, comp, tag_hint=tag_hint)
        out.append({**tokenize_example(tokenizer, prompt, completion, max_length), "id": t.id})
    return out
