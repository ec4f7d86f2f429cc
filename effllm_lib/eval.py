"""Accuracy of a (quantized) causal LM: perplexity on a text, and zero-shot multiple choice.

    from effllm_lib import eval as E
    E.perplexity(model, tokenizer, text, seq_len=2048).ppl
    E.multiple_choice_accuracy(model, tokenizer, E.bigbench_multiple_choice(task)).accuracy

Perplexity follows the GPTQ / BitMoD protocol: tokenize the whole text once, cut it into non-overlapping
windows of ``seq_len`` tokens (2048, or the model's maximum if shorter), and average the next-token negative
log-likelihood over every predicted token. ``bos``: models trained to always see a BOS token first (Gemma)
get one at the start of every window (the window then holds ``seq_len - 1`` text tokens); "auto" does this
exactly when the tokenizer itself adds a BOS token. ``max_windows`` evaluates that many windows spread evenly
over the text (deterministic), for long texts on a slow machine.

Multiple choice scores each answer by the summed log-probability of its tokens after the prompt (zero-shot,
BIG-bench's prompt prefixes) and counts the example right when the best-scoring answer is a gold one;
``accuracy_norm`` divides by the answer's length in characters first (lm-eval-harness's acc_norm).

``window_scores`` scores pre-cut windows and, given the float model as ``reference``, the KL divergence of the
quantized model's next-token distribution from the float one per token (a much lower-variance measure of the
damage than perplexity: the float model's own uncertainty cancels), per window so it can be bootstrapped.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- perplexity
@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    total_windows: int
    seq_len: int
    bos: bool
    seconds: float


def model_max_length(model, cap: int = 2048) -> int:
    """``cap`` or the model's maximum context (``max_position_embeddings``) if that is shorter."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return min(cap, int(n)) if n else cap


def tokenizer_adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts a BOS token in front of plain text by itself (Gemma, Llama-2; not Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _resolve_bos(tokenizer, bos) -> bool:
    if bos == "auto":
        return tokenizer_adds_bos(tokenizer)
    if bos not in (True, False):
        raise ValueError(f"bos must be 'auto', True or False, got {bos!r}")
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id")
    return bos


def windows(token_ids, seq_len: int, bos_id: int | None = None, max_windows: int | None = None
            ) -> tuple[torch.Tensor, int]:
    """([n, seq_len] token windows, total number of windows the text holds).

    Non-overlapping windows of ``seq_len`` tokens; with ``bos_id`` each window is BOS + ``seq_len - 1`` text
    tokens. The tail that does not fill a window is dropped. With ``max_windows`` below the total, that many
    windows evenly spread over the text are kept.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    body = seq_len - (bos_id is not None)
    total = ids.numel() // body
    if total == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {body}")
    chunks = ids[:total * body].view(total, body)
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be positive, got {max_windows}")
        if max_windows < total:
            pick = torch.linspace(0, total - 1, max_windows).round().long().unique()
            chunks = chunks[pick]
    if bos_id is not None:
        chunks = torch.cat([torch.full((chunks.shape[0], 1), bos_id, dtype=torch.long), chunks], 1)
    return chunks, total


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@torch.no_grad()
def perplexity(model, tokenizer, text: str, *, seq_len: int | None = None, max_windows: int | None = None,
               bos="auto", progress: bool = True, desc: str = "perplexity", token_ids=None) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` over non-overlapping windows (see the module docstring).

    ``token_ids`` (the text already tokenized without special tokens) skips re-tokenizing a long text when
    many models are evaluated on it.
    """
    if token_ids is None and (not isinstance(text, str) or not text.strip()):
        raise ValueError("text must be a non-empty string")
    seq_len = seq_len or model_max_length(model)
    use_bos = _resolve_bos(tokenizer, bos)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if token_ids is None else token_ids
    chunks, total = windows(ids, seq_len, tokenizer.bos_token_id if use_bos else None, max_windows)
    from tqdm.auto import tqdm

    model.eval()
    device = _device(model)
    nll_sum, count, start = 0.0, 0, time.perf_counter()
    for row in tqdm(chunks, desc=desc, disable=not progress, leave=False):
        x = row.unsqueeze(0).to(device)
        logits = model(input_ids=x).logits[0, :-1].float()
        nll_sum += float(F.cross_entropy(logits, x[0, 1:], reduction="sum"))
        count += x.shape[1] - 1
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(chunks), total_windows=total,
                            seq_len=seq_len, bos=use_bos, seconds=time.perf_counter() - start)


# --------------------------------------------------------------------------- KL divergence from a reference
@dataclass
class WindowScores:
    """Per-window sums, so that any statistic can be bootstrapped over windows (tokens within a window are
    correlated; windows are the resampling unit) and paired across models scored on the same windows."""

    tokens: torch.Tensor  # [n] predicted tokens per window
    nll_sum: torch.Tensor  # [n] summed next-token negative log-likelihood (nats)
    kl_sum: torch.Tensor  # [n] summed KL(reference || model) per predicted token (nats); NaN where not computed
    top1_same: torch.Tensor  # [n] positions where the model's most likely token is the reference's; NaN likewise


def _kl_and_agreement_parts(ref_logits: torch.Tensor, logits: torch.Tensor, chunk: int = 512):
    """The per-chunk KL sums and argmax agreements as tensors on the device (not read back: on a GPU each read is
    a wait for the whole queue)."""
    kls, sames = [], []
    for i in range(0, ref_logits.shape[0], chunk):
        p_log = torch.log_softmax(ref_logits[i:i + chunk].float(), -1)
        q_log = torch.log_softmax(logits[i:i + chunk].float(), -1)
        kls.append((p_log.exp() * (p_log - q_log)).sum())
        sames.append((p_log.argmax(-1) == q_log.argmax(-1)).sum())
    return kls, sames


def _sum_parts(parts, start):
    """Python's running sum (in double for floats), in order, as the per-chunk loop summed them."""
    for p in parts:
        start += p
    return start


@torch.no_grad()
def window_scores(model, windows: torch.Tensor, reference=None, kl_windows=None, batch_size: int = 1,
                  progress: bool = True, desc: str = "windows", keep_logits: dict | None = None) -> WindowScores:
    """Next-token NLL of ``model`` on every window of ``windows`` ([n, seq_len] token ids), and where
    ``reference`` (the float model) is given, the per-token KL divergence of ``model``'s next-token
    distribution from the reference's, KL(P_ref || P_model) = sum_v p_ref(v) log(p_ref(v) / p_model(v)), as
    llama.cpp's --kl-divergence reports it. ``kl_windows``: indices of the windows that get the KL (default:
    all; the reference needs one extra forward pass per KL window). ``reference`` may instead be a dict
    {window index: the reference's logits [seq_len - 1, vocab]} filled by an earlier call's ``keep_logits``
    (a dict that receives this model's logits of the ``kl_windows``), which saves that forward pass."""
    if not isinstance(windows, torch.Tensor) or windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be a [n, seq_len >= 2] tensor, got {getattr(windows, 'shape', windows)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = windows.shape[0]
    kl_set = set(range(n)) if kl_windows is None else {int(i) for i in kl_windows}
    keep_set = set(kl_set) if keep_logits is not None else set()
    if reference is None:
        kl_set = set()
    elif isinstance(reference, dict):
        missing = sorted(set(kl_set) - set(reference))
        if missing:
            raise ValueError(f"reference logits are missing for windows {missing[:5]}")
    if any(not 0 <= i < n for i in kl_set):
        raise ValueError(f"kl_windows must index the {n} windows")
    from tqdm.auto import tqdm

    model.eval()
    if reference is not None and not isinstance(reference, dict):
        reference.eval()
    device = _device(model)
    nan = float("nan")
    out = WindowScores(torch.full((n,), windows.shape[1] - 1, dtype=torch.long), torch.zeros(n, dtype=torch.float64),
                       torch.full((n,), nan, dtype=torch.float64), torch.full((n,), nan, dtype=torch.float64))
    # KL windows first, in their own batches, so only they pay the reference's forward pass
    with_kl, without = sorted(kl_set | keep_set), [i for i in range(n) if i not in kl_set | keep_set]
    batches = ([with_kl[i:i + batch_size] for i in range(0, len(with_kl), batch_size)]
               + [without[i:i + batch_size] for i in range(0, len(without), batch_size)])
    pending = []  # (window, its NLL sum, its KL and agreement per chunk), all still on the device
    for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
        x = windows[batch].to(device)
        logits = model(input_ids=x).logits
        ref_logits = None
        if batch[0] in kl_set and not isinstance(reference, dict):
            ref_logits = reference(input_ids=x.to(_device(reference))).logits
        for j, w in enumerate(batch):
            nll = F.cross_entropy(logits[j, :-1].float(), x[j, 1:], reduction="sum")
            if w in keep_set:
                keep_logits[w] = logits[j, :-1].float().cpu().clone()
            kls, sames = [], []
            if w in kl_set:
                ref = reference[w] if isinstance(reference, dict) else ref_logits[j, :-1]
                kls, sames = _kl_and_agreement_parts(ref.to(logits.device), logits[j, :-1])
            pending.append((w, nll, kls, sames))
    # every window's sums read back at once (the same numbers as one float() per value, without a GPU sync each)
    flat = [t for _, nll, kls, sames in pending for t in (nll, *kls, *sames)]
    values = torch.stack([t.to(torch.float64) for t in flat]).tolist() if flat else []
    i = 0
    for w, nll, kls, sames in pending:
        out.nll_sum[w] = values[i]
        k = values[i + 1:i + 1 + len(kls)]
        s_ = values[i + 1 + len(kls):i + 1 + len(kls) + len(sames)]
        i += 1 + len(kls) + len(sames)
        if kls:
            out.kl_sum[w], out.top1_same[w] = _sum_parts(k, 0.0), _sum_parts([int(v) for v in s_], 0)
    return out


# ---------------------------------------------------------------------------------------- multiple choice
@dataclass
class MCExample:
    prompt: str
    choices: list[str]
    gold: set[int]


@dataclass
class MCResult:
    accuracy: float
    accuracy_norm: float
    n: int
    correct: list[bool]
    correct_norm: list[bool]
    chance: float  # expected accuracy of a uniform random guess


def bigbench_multiple_choice(task: dict, max_examples: int | None = None, seed: int = 0) -> list[MCExample]:
    """Zero-shot prompts, answers and gold indices of a BIG-bench JSON task with ``target_scores``.

    The prompt is task_prefix + example_input_prefix + input + example_output_prefix (BIG-bench's defaults
    "\\nQ: " and "\\nA: "), as BIG-bench formats its own zero-shot queries. ``max_examples`` keeps a seeded
    random subset (the same for every model, so comparisons are paired).
    """
    if "examples" not in task:
        raise ValueError("not a BIG-bench JSON task: no 'examples'")
    task_prefix = task.get("task_prefix", "")
    in_prefix = task.get("example_input_prefix", "\nQ: ")
    out_prefix = task.get("example_output_prefix", "\nA: ")
    out = []
    for ex in task["examples"]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        best = max(scores.values())
        gold = {i for i, c in enumerate(choices) if scores[c] == best and best > 0}
        if len(choices) < 2 or not gold:
            continue
        prompt = (task_prefix + in_prefix + ex["input"] + out_prefix).rstrip(" ")
        out.append(MCExample(prompt, choices, gold))
    if not out:
        raise ValueError("task has no multiple-choice examples (target_scores)")
    if max_examples is not None and max_examples < len(out):
        gen = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(out), generator=gen)[:max_examples].tolist())
        out = [out[i] for i in keep]
    return out


def _continuation_ids(tokenizer, prompt: str, answer: str, bos_id: int | None) -> tuple[list[int], int]:
    """Token ids of prompt + " " + answer and how many of them belong to the prompt (lm-eval's split: the
    answer is whatever tokenizing the joined string adds after the prompt's own tokens)."""
    ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    n_ctx = len(ctx)
    while n_ctx > 0 and whole[:n_ctx] != ctx[:n_ctx]:  # a merge across the boundary: back off
        n_ctx -= 1
    if bos_id is not None:
        whole, n_ctx = [bos_id] + whole, n_ctx + 1
    if len(whole) <= n_ctx:
        raise ValueError(f"answer {answer!r} adds no tokens to the prompt")
    return whole, n_ctx


@torch.no_grad()
def choice_logprobs(model, tokenizer, example: MCExample, bos="auto") -> list[float]:
    """Summed log-probability of each answer's tokens given the prompt (one padded batch per example)."""
    use_bos = _resolve_bos(tokenizer, bos)
    seqs = [_continuation_ids(tokenizer, example.prompt, c, tokenizer.bos_token_id if use_bos else None)
            for c in example.choices]
    length = max(len(s) for s, _ in seqs)
    device = _device(model)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (s, _) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    logp = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1).cpu()
    out = []
    for i, (s, n_ctx) in enumerate(seqs):
        targets = torch.tensor(s[n_ctx:])
        # the logits at position t predict token t + 1
        out.append(float(logp[i, n_ctx - 1:len(s) - 1].gather(-1, targets[:, None]).sum()))
    return out


def multiple_choice_accuracy(model, tokenizer, examples: list[MCExample], bos="auto", progress: bool = True,
                             desc: str = "multiple choice") -> MCResult:
    """Zero-shot accuracy (and length-normalized accuracy) over ``examples``."""
    if not examples:
        raise ValueError("no examples to score")
    from tqdm.auto import tqdm

    model.eval()
    correct, correct_norm = [], []
    for ex in tqdm(examples, desc=desc, disable=not progress, leave=False):
        lp = choice_logprobs(model, tokenizer, ex, bos)
        norm = [v / max(len(c), 1) for v, c in zip(lp, ex.choices)]
        correct.append(max(range(len(lp)), key=lp.__getitem__) in ex.gold)
        correct_norm.append(max(range(len(norm)), key=norm.__getitem__) in ex.gold)
    chance = sum(len(ex.gold) / len(ex.choices) for ex in examples) / len(examples)
    return MCResult(accuracy=sum(correct) / len(correct), accuracy_norm=sum(correct_norm) / len(correct_norm),
                    n=len(examples), correct=correct, correct_norm=correct_norm, chance=chance)
