"""GRPO with the big model in the loop: TRL's ``GRPOTrainer``, rollouts through the two-model controller.

What the paper lacked, added through TRL's extension points (no fork of the trainer):

* **Rollouts through the controller** (``rollout_func``): each completion is written by ``Controller`` in
  ``tags`` mode, so after the policy writes ``<bigmodel>`` the big model really writes the span, and the policy's
  probes decide where ``</bigmodel>`` goes. The policy is trained on the text as it came out, big spans included.
* **Big-model tokens masked out of the policy loss**: the rollout returns ``env_mask`` (TRL's mask for tokens the
  policy did not sample): 1 for the policy's own tokens (its tags, and the closing tag its probe chose), 0 for the
  big model's text and for a closing tag the controller appended at the segment cap.
* **A cost per big token** in the reward (``big_cost`` = -``big_token_cost`` x the big model's kept tokens,
  counted in its own tokenizer), next to the paper's three rewards (``rewards.py``: accuracy, format, tag count;
  equal weights). Coverage and the big fraction are logged as zero-weight reward columns.

Every reward term, the KL to the reference model, the completion lengths and the loss are in TRL's log history;
``grpo_`` saves them with ``results.save`` (one row per step). Resumption works as in ``train_sft``: ``run.json``
must match, the Trainer's checkpoints carry the optimizer, scheduler, RNG and log, ``max_minutes`` stops with a
checkpoint before a call's time limit.

Token-level note: the controller hands text between models; the completion ids the loss sees are each segment's
text re-tokenized with the policy's tokenizer, which can differ from the ids the policy sampled where BPE has two
spellings of one string (rare; the text is the same).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from .controller import Controller
from .problems import build_prompt
from .rewards import BIG_CLOSE, accuracy_reward, coverage, format_reward, tag_count_reward
from .sft_data import gsm_items
from .tags import check_tag_tokens
from .train_sft import check_run_file, load_model, time_budget_callback


@dataclass(frozen=True)
class GRPOSetup:
    n_train: int = 2000          # prompts (train templates only)
    data_seed: int = 1           # other items than the SFT data's seed 0
    num_generations: int = 8     # the paper: 14
    batch_size: int = 8          # completions per device per step (a multiple of num_generations)
    grad_accum: int = 1
    lr: float = 1e-6             # the paper's
    beta: float = 0.04           # KL weight, TRL 0.16's default the paper ran with
    epsilon: float = 0.2         # clip
    temperature: float = 0.7
    max_new_tokens: int = 512
    chunk_tokens: int = 64       # the paper's controller
    probe_tokens: int = 8
    max_big_segment: int = 512
    big_token_cost: float = 0.002  # reward per big-model token (100 big tokens cost 0.2)
    tag_hint: bool = True
    max_steps: int = 200
    save_steps: int = 10
    seed: int = 0
    bf16: bool = False

    def __post_init__(self):
        for name in ("n_train", "num_generations", "batch_size", "grad_accum", "max_new_tokens", "chunk_tokens",
                     "probe_tokens", "max_big_segment", "max_steps", "save_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2 (GRPO compares completions of one prompt)")
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(f"batch_size x grad_accum ({self.batch_size * self.grad_accum}) must be a multiple "
                             f"of num_generations ({self.num_generations})")
        if self.big_token_cost < 0 or self.temperature <= 0 or self.lr <= 0 or self.beta < 0:
            raise ValueError("need big_token_cost >= 0, temperature > 0, lr > 0, beta >= 0")


# ------------------------------------------------------------------------------------------ token attribution
def attribute_segments(text: str, segments: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(writer, text) pieces that concatenate to ``text`` exactly. The controller's segments leave out the closing
    tag written at a handoff (the policy's probe chose it): it is attributed to the small model. A closing tag
    appended at the segment cap is ``("cap", "</bigmodel>")``."""
    out, pos = [], 0
    for who, seg in segments:
        while not text.startswith(seg, pos) and text.startswith(BIG_CLOSE, pos):
            out.append(("small", BIG_CLOSE))
            pos += len(BIG_CLOSE)
        if not text.startswith(seg, pos):
            raise RuntimeError(f"controller segments do not rebuild the text at character {pos}")
        if seg:
            out.append((who, seg))
        pos += len(seg)
    while text.startswith(BIG_CLOSE, pos):
        out.append(("small", BIG_CLOSE))
        pos += len(BIG_CLOSE)
    if pos != len(text):
        raise RuntimeError(f"controller segments cover {pos} of {len(text)} characters")
    return out


def completion_ids_and_mask(tokenizer, pieces: list[tuple[str, str]], finished: bool) -> tuple[list[int], list[int]]:
    """The policy tokenizer's ids of each piece, and 1 where the policy wrote it (0: big model, cap tag). A
    finished completion ends with the policy's end-of-sequence id (masked like the piece it ends)."""
    ids, mask = [], []
    for who, seg in pieces:
        t = list(tokenizer(seg, add_special_tokens=False)["input_ids"])
        ids += t
        mask += [1 if who == "small" else 0] * len(t)
    if finished:
        ids.append(tokenizer.eos_token_id)
        mask.append(1 if pieces and pieces[-1][0] == "small" else 0)
    return ids, mask


def make_rollout(big, setup: GRPOSetup, prompt_to_question: dict[str, str]):
    """TRL ``rollout_func(prompts, trainer)``: one controller completion per prompt (the sampler already repeats
    each prompt ``num_generations`` times)."""
    big_model, big_tok = big

    def rollout(prompts, trainer):
        policy = trainer.accelerator.unwrap_model(trainer.model)
        tok = trainer.processing_class
        was_training = policy.training
        policy.eval()
        rank = trainer.accelerator.process_index
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": [], "big_tokens": [],
               "big_fraction": []}
        try:
            for i, prompt in enumerate(prompts):
                if prompt not in prompt_to_question:
                    raise KeyError("rollout got a prompt that is not in the training set")
                big_prompt = build_prompt(big_tok, prompt_to_question[prompt])
                seed = ((setup.seed * 1_000_003 + trainer.state.global_step) * 64 + rank) * 4096 + i
                ctl = Controller((policy, tok), (big_model, big_tok), chunk_tokens=setup.chunk_tokens,
                                 probe_tokens=setup.probe_tokens, max_big_segment=setup.max_big_segment,
                                 max_new_tokens=setup.max_new_tokens, temperature=setup.temperature, seed=seed)
                gen = ctl.generate(prompt, big_prompt, mode="tags")
                pieces = attribute_segments(gen.text, gen.segments)
                ids, mask = completion_ids_and_mask(tok, pieces, gen.finished)
                out["prompt_ids"].append(list(tok(prompt, add_special_tokens=False)["input_ids"]))
                out["completion_ids"].append(ids)
                out["env_mask"].append(mask)
                out["big_tokens"].append(gen.big.kept_tokens)
                out["big_fraction"].append(gen.big_fraction)
        finally:
            policy.train(was_training)
        return out

    return rollout


# ------------------------------------------------------------------------------------------------ rewards
def _text(c) -> str:
    return c if isinstance(c, str) else c[-1]["content"]


def reward_functions(setup: GRPOSetup):
    """TRL reward functions (named for the logs) and their weights: the paper's three at weight 1, the big-token
    cost at weight 1, coverage and big fraction at weight 0 (logged only)."""
    def accuracy(completions, answer, **kw):
        return [accuracy_reward(_text(c), a) for c, a in zip(completions, answer)]

    def format(completions, **kw):  # noqa: A001 - the name is the log column
        return [format_reward(_text(c)) for c in completions]

    def tag_count(completions, **kw):
        return [tag_count_reward(_text(c)) for c in completions]

    def big_cost(completions, big_tokens, **kw):
        return [-setup.big_token_cost * n for n in big_tokens]

    def tag_coverage(completions, **kw):
        return [coverage(_text(c)) for c in completions]

    def big_fraction(completions, big_fraction, **kw):
        return list(big_fraction)

    funcs = [accuracy, format, tag_count, big_cost, tag_coverage, big_fraction]
    return funcs, [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def grpo_log_table(log_history: list[dict]) -> pd.DataFrame:
    rows = [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in log_history if "loss" in r]
    return pd.DataFrame(rows)


def grpo_(policy_spec: str, big_spec: str, out_dir: str | os.PathLike, setup: GRPOSetup, *, device: str = "cpu",
          max_minutes: float | None = None, results_name: str | None = None, scale: str = "ci") -> dict:
    """Train (or resume) GRPO from a tagged SFT checkpoint ``policy_spec`` with the big model ``big_spec``."""
    import datasets
    from transformers.trainer_utils import get_last_checkpoint
    from trl import GRPOConfig, GRPOTrainer

    if not isinstance(setup, GRPOSetup):
        raise TypeError(f"setup must be a GRPOSetup, got {type(setup).__name__}")
    out = Path(out_dir)
    identity = {"policy": policy_spec, "big": big_spec, **asdict(setup)}
    check_run_file(out, identity)
    policy, tok = load_model(policy_spec, device=device)
    check_tag_tokens(policy, tok)  # GRPO starts from the tags stage of SFT
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    big_model, big_tok = load_model(big_spec, dtype=torch.bfloat16 if setup.bf16 else torch.float32, device=device)
    big_model.eval().requires_grad_(False)
    items = gsm_items("train", setup.n_train, seed=setup.data_seed)
    prompts = {build_prompt(tok, t.question, tag_hint=setup.tag_hint): t for t in items}
    data = datasets.Dataset.from_list([{"prompt": p, "answer": t.answer} for p, t in prompts.items()])
    funcs, weights = reward_functions(setup)
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=setup.batch_size, gradient_accumulation_steps=setup.grad_accum,
        num_generations=setup.num_generations, learning_rate=setup.lr, beta=setup.beta, epsilon=setup.epsilon,
        temperature=setup.temperature, max_completion_length=setup.max_new_tokens, max_steps=setup.max_steps,
        save_steps=setup.save_steps, save_total_limit=2, logging_steps=1, report_to="none", bf16=setup.bf16,
        seed=setup.seed, data_seed=setup.data_seed, reward_weights=weights, use_cpu=device == "cpu",
        disable_tqdm=True, remove_unused_columns=False)
    budget = time_budget_callback(max_minutes)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trainer = GRPOTrainer(model=policy, reward_funcs=funcs, args=args, train_dataset=data, processing_class=tok,
                          rollout_func=make_rollout((big_model, big_tok), setup,
                                                    {p: t.question for p, t in prompts.items()}),
                          callbacks=[budget])
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    trainer.train(resume_from_checkpoint=last)
    state = trainer.state
    done = not budget.stopped_early and state.global_step >= state.max_steps
    final = out / "final"
    if done and trainer.is_world_process_zero():
        trainer.save_model(str(final))
        tok.save_pretrained(str(final))
    table = grpo_log_table(state.log_history)
    if results_name and trainer.is_world_process_zero():
        from .. import results

        results.save(table, "splitreason", results_name, scale=scale,
                     params={**identity, "device": device, "done": done, "steps": state.global_step,
                             "world_size": args.world_size})
    return {"done": done, "step": state.global_step, "final": str(final) if done else None, "log": table}
