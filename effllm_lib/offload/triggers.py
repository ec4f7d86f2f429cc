"""Training-free offload triggers: the small model writes in windows; a window the trigger flags is thrown away
and the big model writes a span from the same point instead, then hands back.

Kinds (``TriggerConfig.kind``), each a score per window, higher = more reason to hand off:

* ``entropy``: the small model's mean next-token entropy (nats) over the window's tokens;
* ``margin``: minus the small model's mean top-2 log-probability margin over the window (a small margin is doubt);
* ``gap``: a likelihood-gap probe: the big model scores the window the small model just wrote (its text, in the big
  model's tokens, fed into the big model's KV cache). Score = (log p_small(window) - log p_big(window)) / tokens of
  the window: how much less likely the big model finds the span than the small model did;
* ``random``: a seeded uniform draw (the random-switching baseline, matched in mechanics: same windows, same spans,
  same budget guard; only where the handoffs land differs);
* ``step``: step-level speculative reasoning (a baseline): windows end at a step delimiter (``step_delimiter``,
  a newline by default, or ``window`` tokens), the big model scores each step by its mean log-probability
  (score = minus that mean), and rewrites a rejected step (its span also runs to the delimiter).

The budget knob sets the target offload fraction f (big-model tokens kept / all tokens kept). Two parts:

* a threshold: ``calibrate_threshold`` runs the controller with no handoffs on a few calibration prompts, pools the
  window scores, and takes their (1 - q) quantile, q the share of windows to hand off for a fraction f when a window
  of W small tokens is replaced by a span of S big tokens: q S / (q S + (1 - q) W) = f;
* an online guard: a window is handed off only while the running big fraction is below f, so the fraction ends at
  most one span above f.

Accounting follows ``controller.ModelStats``: the small model's rolled-back tokens are the windows replaced by the
big model; with ``gap`` the big model's scored tokens are prefill (and rolled back out of its cache when it takes
over); with ``step`` likewise. ``Generation.segments`` holds (model, text, token ids) of everything kept.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from .controller import Generation, ModelStats, Session

KINDS = ("entropy", "margin", "gap", "random", "step")


@dataclass(frozen=True)
class TriggerConfig:
    kind: str
    budget: float                 # target offload fraction (big tokens kept / all kept), in [0, 1]
    threshold: float = math.inf   # hand off a window whose score is above this (inf: never; calibrate it)
    window: int = 16              # small-model tokens per decision (``step``: at most, ends at the delimiter)
    big_span: int = 16            # big-model tokens per handoff (``step``: at most, ends at the delimiter)
    step_delimiter: str = "\n"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.budget, (int, float)) or not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget is an offload fraction in [0, 1], got {self.budget!r}")
        if not isinstance(self.threshold, (int, float)) or math.isnan(self.threshold):
            raise ValueError(f"threshold must be a number (inf: never hand off), got {self.threshold!r}")
        for name in ("window", "big_span"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.step_delimiter, str) or not self.step_delimiter:
            raise ValueError("step_delimiter must be a non-empty string")


def handoff_share(budget: float, window: int, big_span: int) -> float:
    """Share q of windows to hand off so that big tokens / all tokens = ``budget`` when each handoff replaces
    ``window`` small tokens with ``big_span`` big ones: q S / (q S + (1 - q) W) = f."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"budget must be in [0, 1], got {budget!r}")
    if budget == 1.0:
        return 1.0
    return budget * window / (big_span * (1 - budget) + budget * window)


def threshold_for(scores, budget: float, window: int, big_span: int) -> float:
    """The (1 - q) quantile of calibration ``scores`` (q from ``handoff_share``): about a share q of windows
    score above it. Budget 0 gives inf (never), budget 1 gives -inf (always, up to the guard)."""
    scores = [float(s) for s in scores]
    if not scores or not all(math.isfinite(s) for s in scores):
        raise ValueError("threshold_for needs at least one finite calibration score")
    q = handoff_share(budget, window, big_span)
    if q <= 0:
        return math.inf
    if q >= 1:
        return -math.inf
    return float(torch.quantile(torch.tensor(scores, dtype=torch.float64), 1 - q))


@dataclass
class TriggerGeneration(Generation):
    handoffs: int = 0
    scores: list = field(default_factory=list)  # every window's score, handed off or not

    def summary(self) -> dict:
        return {**super().summary(), "handoffs": self.handoffs, "windows": len(self.scores)}


class TriggerController:
    """Small model in windows, big model on the windows a trigger flags. ``small``/``big``: (model, tokenizer)."""

    def __init__(self, small, big, config: TriggerConfig, *, max_new_tokens: int = 256, seed: int = 0,
                 use_cache: bool = True):
        for name, pair in (("small", small), ("big", big)):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"{name} must be a (model, tokenizer) tuple")
        if not isinstance(config, TriggerConfig):
            raise TypeError(f"config must be a TriggerConfig, got {type(config).__name__}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        self.small, self.big, self.cfg = small, big, config
        self.max_new_tokens, self.seed, self.use_cache = max_new_tokens, seed, use_cache

    def _session(self, which, stats):
        model, tok = self.small if which == "small" else self.big
        return Session(which, model, tok, stats, use_cache=self.use_cache, temperature=0.0)

    def generate(self, small_prompt: str, big_prompt: str | None = None) -> TriggerGeneration:
        if not isinstance(small_prompt, str) or not small_prompt:
            raise ValueError("small_prompt must be a non-empty string")
        big_prompt = small_prompt if big_prompt is None else big_prompt
        cfg = self.cfg
        st_small, st_big = ModelStats(), ModelStats()
        small, big = self._session("small", st_small), self._session("big", st_big)
        rng = random.Random(self.seed)
        t0 = time.perf_counter()
        completion, segments, scores, handoffs, finished = "", [], [], 0, False
        delim = cfg.step_delimiter if cfg.kind == "step" else None
        while True:
            budget = self.max_new_tokens - st_small.kept_tokens - st_big.kept_tokens
            if budget <= 0:
                break
            small.catch_up(small_prompt + completion)
            logits_before, text_before = small.next_logits, small.text
            ids, text, eos, stats = _decode_scored(small, min(cfg.window, budget), delim)
            if not ids:  # the small model ends here: nothing to judge
                finished = eos
                break
            big_fed = None
            if cfg.kind in ("gap", "step"):
                big.catch_up(big_prompt + completion)
                big_fed = (big.next_logits, big.text, len(big.ids))
                lp_big, n_big = _score_text(big, text)
                if cfg.kind == "gap":
                    score = (sum(stats["logprob"]) - lp_big) / len(ids)
                else:
                    score = -lp_big / max(1, n_big)
            elif cfg.kind == "entropy":
                score = sum(stats["entropy"]) / len(ids)
            elif cfg.kind == "margin":
                score = -sum(stats["margin"]) / len(ids)
            else:
                score = rng.random()
            scores.append(score)
            kept = st_small.kept_tokens + st_big.kept_tokens
            running = st_big.kept_tokens / kept if kept else 0.0
            if not (score > cfg.threshold and running < cfg.budget):
                completion += text
                segments.append(("small", text, ids))
                if eos:
                    finished = True
                    break
                continue
            # ---- handoff: drop the window, the big model writes a span from the same point
            handoffs += 1
            st_small.rolled_back += len(ids)
            small.rollback(len(ids), text_before, logits_before)
            if big_fed is not None:  # the probe fed the window into the big model's cache: take it back out
                big.rollback(len(big.ids) - big_fed[2], big_fed[1], big_fed[0])
            big.catch_up(big_prompt + completion)
            budget = self.max_new_tokens - st_small.kept_tokens - st_big.kept_tokens
            b_ids, b_text, b_eos = big.decode(min(cfg.big_span, budget), stop_text=delim)
            completion += b_text
            if b_ids:
                segments.append(("big", b_text, b_ids))
            if b_eos:
                finished = True
                break
        st_small.context_tokens, st_big.context_tokens = len(small.ids), len(big.ids)
        gen = TriggerGeneration(completion, cfg.kind, st_small, st_big, finished, segments,
                                time.perf_counter() - t0, handoffs=handoffs, scores=scores)
        return gen


def _decode_scored(sess: Session, n: int, stop_text: str | None):
    """Greedy decode of up to ``n`` tokens (stop at end-of-sequence or once the new text holds ``stop_text``),
    keeping per token the log-probability of the chosen token, the entropy and the top-2 log-prob margin of the
    distribution it was drawn from."""
    if sess.next_logits is None:
        raise RuntimeError(f"{sess.name}: nothing fed yet")
    t0 = time.perf_counter()
    new, eos = [], False
    stats = {"logprob": [], "entropy": [], "margin": []}
    for _ in range(n):
        logp = torch.log_softmax(sess.next_logits.double(), dim=-1)
        tok = int(torch.argmax(logp))
        if tok in sess.stop_ids:
            eos = True
            break
        top2 = torch.topk(logp, 2).values
        stats["logprob"].append(float(logp[tok]))
        stats["entropy"].append(float(-(logp.exp() * logp).sum()))
        stats["margin"].append(float(top2[0] - top2[1]))
        sess.stats.decode_tokens += 1
        sess.next_logits = sess._forward([tok])
        new.append(tok)
        if stop_text is not None and stop_text in sess.dec(new[-16:]):
            break
    text = sess.dec(new) if new else ""
    sess.text += text
    sess.stats.decode_s += time.perf_counter() - t0
    return new, text, eos, stats


def _score_text(sess: Session, text: str) -> tuple[float, int]:
    """Feed ``text`` to the session in one forward (counted as prefill) and return (sum of the log-probabilities
    the model gave its tokens, number of tokens). The session's view then includes ``text``."""
    ids = sess.encode(text)
    if not ids:
        return 0.0, 0
    t0 = time.perf_counter()
    prev = sess.next_logits
    sess.stats.forward_calls += 1
    with torch.inference_mode():
        start = len(sess.ids)
        x = torch.tensor([ids], device=sess.device)
        pos = torch.arange(start, start + len(ids), device=sess.device)[None]
        if sess.use_cache:
            out = sess.model(input_ids=x, position_ids=pos, past_key_values=sess.cache, use_cache=True,
                             logits_to_keep=len(ids))
            sess.cache = out.past_key_values
        else:
            full = torch.tensor([sess.ids + ids], device=sess.device)
            out = sess.model(input_ids=full, position_ids=torch.arange(full.shape[1], device=sess.device)[None],
                             use_cache=False, logits_to_keep=len(ids))
    logits = out.logits[0].double()  # logits after each fed token
    before = torch.cat([prev.double()[None], logits[:-1]], dim=0)  # the distribution each token was drawn from
    lp = torch.log_softmax(before, dim=-1).gather(1, torch.tensor(ids, device=before.device)[:, None]).sum()
    sess.ids = sess.ids + ids
    sess.next_logits = logits[-1].float()
    sess.text += text
    sess.stats.prefill_tokens += len(ids)
    sess.stats.prefill_s += time.perf_counter() - t0
    return float(lp), len(ids)


def calibrate_threshold(small, big, prompts: list[tuple[str, str]], config: TriggerConfig, *,
                        max_new_tokens: int = 256) -> tuple[float, list[float]]:
    """Run ``config``'s trigger with no handoffs on (small_prompt, big_prompt) pairs; return (threshold for
    ``config.budget``, the pooled window scores)."""
    if not prompts:
        raise ValueError("calibrate_threshold needs at least one prompt pair")
    if config.kind == "random":  # uniform scores: the quantile is exact, no run needed
        q = handoff_share(config.budget, config.window, config.big_span)
        return (math.inf if q <= 0 else 1.0 - q), []
    probe = TriggerConfig(config.kind, 0.0, math.inf, config.window, config.big_span, config.step_delimiter)
    scores: list[float] = []
    for sp, bp in prompts:
        scores += TriggerController(small, big, probe, max_new_tokens=max_new_tokens).generate(sp, bp).scores
    return threshold_for(scores, config.budget, config.window, config.big_span), scores
