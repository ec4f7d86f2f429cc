"""Supervised fine-tuning of the small model: to competence on reference traces, then with ``<bigmodel>`` tags.

``sft_(model_spec, out_dir, SFTConfig(...))`` trains with the transformers ``Trainer`` (plain causal-LM loss; the
labels of ``sft_data`` already carry -100 on the prompt, so the loss is on the completion only: TRL's
SFTTrainer would add nothing here but a dependency on ``datasets`` the GPU machine lacks). The paper's recipe:
lr 5e-5, 5% warmup, cosine down to 10% of the peak, 3 epochs; our batch is smaller (a 135M model, a few thousand
short traces) and there is no packing (each example keeps its own attention).

Stages: ``competence`` (reference traces, no tags) and ``tags`` (the annotated traces of ``annotations``, a JSON
lines file of ``{"id", "steps"}`` written by ``python -m effllm_lib.offload.train annotate``; the tags are added
to the vocabulary first, ``tags.add_tag_tokens``).

Resumable: ``out_dir`` holds ``run.json`` (the config and model spec), the Trainer's checkpoints (model, optimizer,
scheduler, RNG and data position), and ``final/`` (model + tokenizer) once the run is complete. A second call
resumes from the last checkpoint; one with different settings is an error naming them. ``max_minutes`` stops
(and checkpoints) a run before a time limit, so it can go on in the next call. The loss curve is saved with
``results.save`` (chapter splitreason) from the Trainer's log history, which checkpoints carry across resumes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from ..paths import atomic_write
from . import sft_data
from .tags import add_tag_tokens, check_tag_tokens, has_tag_tokens

STAGES = ("competence", "tags")
RUN_FILE, FINAL_DIR = "run.json", "final"


@dataclass(frozen=True)
class SFTConfig:
    stage: str = "competence"
    n_train: int = 4000          # training items (train templates only)
    data_seed: int = 0
    annotations: str | None = None  # stage "tags": JSON lines {"id", "steps"} with tags in the steps
    tag_hint: bool = False       # put SplitReason's tag hint in the prompt
    epochs: float = 3.0
    max_steps: int = -1          # > 0 overrides epochs (tests, smoke runs)
    lr: float = 5e-5
    warmup: float = 0.05         # fraction of the steps
    min_lr_rate: float = 0.1     # cosine down to 10% of the peak, as the paper's code
    weight_decay: float = 0.0
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 1024
    save_steps: int = 100
    seed: int = 0
    bf16: bool = False

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if (self.stage == "tags") != (self.annotations is not None):
            raise ValueError("stage 'tags' needs annotations (and only it takes them)")
        for name in ("n_train", "batch_size", "grad_accum", "max_length", "save_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.warmup < 1 and 0 <= self.min_lr_rate <= 1 and self.epochs > 0):
            raise ValueError("need lr > 0, 0 <= warmup < 1, 0 <= min_lr_rate <= 1, epochs > 0")


# ---------------------------------------------------------------------------------------- run identity
def check_run_file(out_dir: Path, identity: dict) -> None:
    """Write ``run.json`` on the first call; later calls must match it (a resumed run with other settings would
    silently be a different run)."""
    path = out_dir / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in diff)
            raise ValueError(f"{out_dir} holds a run with other settings ({detail}); use a new out_dir to start "
                             f"another run")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(identity, indent=1, sort_keys=True) + "\n")


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) from a transformers folder, a ``.gguf`` file (converted once, next to the run) or a
    packaged model name ('smollm2-135m', ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..models import MODELS, hf_dir

    if spec in MODELS:
        folder = hf_dir(spec)
    else:
        from .parallel import check_model_spec, prepare_model

        info = check_model_spec(spec, "model")
        if info["kind"] == "tiny":
            raise ValueError("tiny:<arch> models have a byte tokenizer without a chat template or added tokens; "
                             "save a tiny model with a real tokenizer to a folder instead")
        cache = os.environ.get("EFFLLM_TRAIN_HF_CACHE", "/tmp/effllm-splitreason-hf")
        folder = prepare_model(info, "float32", cache)["load"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(folder)


def read_annotations(path: str | os.PathLike) -> dict[str, str]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or not all({"id", "steps"} <= set(r) for r in rows):
        raise ValueError(f"{path}: expected JSON lines with 'id' and 'steps'")
    return {r["id"]: r["steps"] for r in rows}


def build_dataset(tokenizer, cfg: SFTConfig) -> list[dict]:
    items = sft_data.gsm_items("train", cfg.n_train, seed=cfg.data_seed)
    completions = None
    if cfg.stage == "tags":
        steps = read_annotations(cfg.annotations)
        missing = [t.id for t in items if t.id not in steps]
        if missing:
            raise ValueError(f"{cfg.annotations} lacks {len(missing)} of the {len(items)} training items "
                             f"(first: {missing[0]}); annotate with the same n_train and data_seed")
        for t in items:
            plain = steps[t.id].replace("<bigmodel>", "").replace("</bigmodel>", "")
            if plain != t.steps:
                raise ValueError(f"annotation of {t.id} changes the trace's text, not just its tags")
        completions = [t.completion(steps[t.id]) for t in items]
    return sft_data.sft_examples(tokenizer, items, completions=completions, tag_hint=cfg.tag_hint,
                                 max_length=cfg.max_length)


class PadCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the longest in the batch."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        n = max(len(b["input_ids"]) for b in batch)
        def pad(key, value):
            return torch.tensor([b[key] + [value] * (n - len(b[key])) for b in batch])
        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0),
                "labels": pad("labels", sft_data.IGNORE_INDEX)}


class _Examples(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in rows]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def time_budget_callback(max_minutes: float | None):
    """Stops training (with a checkpoint) once ``max_minutes`` have passed since the callback was made."""
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        def __init__(self):
            self.deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
            self.stopped_early = False

        def on_step_end(self, args, state, control, **kw):
            if self.deadline is not None and time.monotonic() > self.deadline:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_early = True
            return control

    return TimeBudget()


def log_table(log_history: list[dict]) -> pd.DataFrame:
    """One row per logged training step: step, epoch, loss, learning rate, gradient norm."""
    rows = [{"step": r["step"], "epoch": r.get("epoch"), "loss": r["loss"], "lr": r.get("learning_rate"),
             "grad_norm": r.get("grad_norm")} for r in log_history if "loss" in r]
    return pd.DataFrame(rows, columns=["step", "epoch", "loss", "lr", "grad_norm"])


def sft_(model_spec: str, out_dir: str | os.PathLike, cfg: SFTConfig, *, device: str = "cpu",
         max_minutes: float | None = None, results_name: str | None = None, scale: str = "ci") -> dict:
    """Train (or resume) one SFT run. Returns {"done", "step", "final", "log"}; ``final`` is the folder of the
    trained model + tokenizer once the run is complete."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    if not isinstance(cfg, SFTConfig):
        raise TypeError(f"cfg must be an SFTConfig, got {type(cfg).__name__}")
    out = Path(out_dir)
    identity = {"model": model_spec, **asdict(cfg)}
    check_run_file(out, identity)
    model, tok = load_model(model_spec, device=device)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if cfg.stage == "tags":
        add_tag_tokens(model, tok)  # an already tagged base is an error there
    elif has_tag_tokens(tok):
        raise ValueError(f"{model_spec} already has tag tokens; stage 'competence' starts from an untagged model")
    data = _Examples(build_dataset(tok, cfg))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps, warmup_steps=cfg.warmup,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": cfg.min_lr_rate},
        weight_decay=cfg.weight_decay, logging_steps=1, save_steps=cfg.save_steps, save_total_limit=2,
        report_to="none", bf16=cfg.bf16, seed=cfg.seed, data_seed=cfg.data_seed, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=device == "cpu", disable_tqdm=True)
    budget = time_budget_callback(max_minutes)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=PadCollator(tok.pad_token_id),
                      callbacks=[budget])
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    state = trainer.state
    done = not budget.stopped_early and state.global_step >= state.max_steps
    final = out / FINAL_DIR
    if done and trainer.is_world_process_zero():
        trainer.save_model(str(final))
        tok.save_pretrained(str(final))
        if cfg.stage == "tags":
            check_tag_tokens(trainer.model, tok)
    table = log_table(state.log_history)
    if results_name and trainer.is_world_process_zero():
        from .. import results

        params = {**identity, "device": device, "done": done, "steps": state.global_step,
                  "examples": len(data), "world_size": args.world_size}
        results.save(table, "splitreason", results_name, params=params, scale=scale)
    return {"done": done, "step": state.global_step, "max_steps": state.max_steps,
            "final": str(final) if done else None, "log": table}

