"""Assisted generation (draft and verify) as a baseline: transformers' ``generate(assistant_model=...)``.

The small model drafts a few tokens, the big model checks them in one forward and keeps the longest prefix it
would have written itself (greedy), so the text is the big model's greedy text: accuracy is the big model's, and
what changes is how many big-model forwards it takes. When the two models' tokenizers differ, transformers'
universal assisted decoding (``tokenizer=`` and ``assistant_tokenizer=``) translates the draft between them.

We use transformers' implementation rather than our controller: it is the established one, and the baseline
should be what a user would run. The big model's forwards are counted with a forward hook: each is one
verification round, which yields one token of the big model's own (the correction, or the bonus token after a
fully accepted draft); the rest of the new tokens were drafted by the small model and accepted.
"""

from __future__ import annotations

import time

import torch

from .controller import ModelStats, stop_token_ids


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()


def _count_calls(module) -> tuple[list[int], object]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    return calls, module.register_forward_hook(hook)


def assisted_generate(small, big, big_prompt: str, *, max_new_tokens: int = 256,
                      num_assistant_tokens: int = 8) -> dict:
    """One greedy completion of ``big_prompt`` by the big model with the small model as assistant.

    Returns the text, the new token ids (big tokenizer), and the accounting: ``big_forwards`` (verification
    rounds), ``small_forwards``, ``drafted_accepted`` = new tokens - big forwards (tokens the big model took from
    the draft), their share ``drafted_share``, ``finished`` (stopped on an end-of-sequence id) and ``wall_s``."""
    for name, pair in (("small", small), ("big", big)):
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise TypeError(f"{name} must be a (model, tokenizer) tuple")
    if not isinstance(big_prompt, str) or not big_prompt:
        raise ValueError("big_prompt must be a non-empty string")
    for name, v in (("max_new_tokens", max_new_tokens), ("num_assistant_tokens", num_assistant_tokens)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    (s_model, s_tok), (b_model, b_tok) = small, big
    dev = next(b_model.parameters()).device
    ids = torch.tensor([list(b_tok(big_prompt, add_special_tokens=False)["input_ids"])], device=dev)
    stops = sorted(stop_token_ids(b_tok, b_model))
    kwargs = dict(assistant_model=s_model, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops,
                  pad_token_id=stops[0] if stops else None, attention_mask=torch.ones_like(ids))
    if not _same_vocab(s_tok, b_tok):
        kwargs.update(tokenizer=b_tok, assistant_tokenizer=s_tok)
    # the assistant drafts a fixed number of tokens per round (not transformers' adaptive heuristic), so rounds
    # are comparable across problems; restored afterwards
    gcfg = s_model.generation_config
    saved = {k: getattr(gcfg, k, None) for k in ("num_assistant_tokens", "num_assistant_tokens_schedule",
                                                   "assistant_confidence_threshold")}
    gcfg.num_assistant_tokens, gcfg.num_assistant_tokens_schedule = num_assistant_tokens, "constant"
    gcfg.assistant_confidence_threshold = 0.0
    b_calls, b_hook = _count_calls(b_model)
    s_calls, s_hook = _count_calls(s_model)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = b_model.generate(ids, **kwargs)
    finally:
        b_hook.remove()
        s_hook.remove()
        for k, v in saved.items():
            setattr(gcfg, k, v)
    wall = time.perf_counter() - t0
    new = [int(t) for t in out[0, ids.shape[1]:]]
    finished = False
    for i, t in enumerate(new):  # cut at the first stop id (and the padding after it)
        if t in stops:
            new, finished = new[:i], True
            break
    text = b_tok.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    n, rounds = len(new), b_calls[0]
    accepted = max(0, n - rounds)
    return {"text": text, "ids": new, "big_forwards": rounds, "small_forwards": s_calls[0],
            "drafted_accepted": accepted, "drafted_share": accepted / n if n else 0.0, "finished": finished,
            "wall_s": wall, "generated_tokens": n}


def assisted_record(result: dict) -> dict:
    """The accounting of ``assisted_generate`` in the controller's summary columns (``baselines.summarize``):
    the big model keeps every token (it verifies all of them); the drafted share is reported apart."""
    st_small, st_big = ModelStats(), ModelStats()
    st_big.decode_tokens = result["generated_tokens"]
    st_small.decode_tokens = 0
    out = {"mode": "assisted", "big_fraction": 1.0, "finished": result["finished"], "wall_s": result["wall_s"],
           "chars": len(result["text"]), "handoffs": result["big_forwards"], "windows": result["big_forwards"],
           "drafted_accepted": result["drafted_accepted"], "drafted_share": result["drafted_share"],
           "big_forwards": result["big_forwards"], "small_forwards": result["small_forwards"]}
    for name, st in (("small", st_small), ("big", st_big)):
        for key in ("prefill_tokens", "decode_tokens", "rolled_back", "adopted_tokens", "probe_prefill_tokens",
                    "probe_decode_tokens", "prefill_s", "decode_s", "probe_s"):
            out[f"{name}_{key}"] = getattr(st, key)
        out[f"{name}_kept_tokens"] = st.kept_tokens
    return out
