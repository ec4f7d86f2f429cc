"""The SplitReason inference controller over two Hugging Face causal LMs, with explicit KV caches.

A shared completion text is written by two models. The small model decodes until it writes ``<bigmodel>``;
the big model then decodes chunks of ``chunk_tokens``; after each chunk the small model is probed, in one
batch, with a ``probe_tokens`` lookahead from every prefix of the chunk, and control returns to it at the
longest prefix whose lookahead writes ``</big``. A big segment is capped at ``max_big_segment`` tokens (then
``</bigmodel>`` is appended) and the whole completion at ``max_new_tokens``.

What differs from the original (modes/speculative_reasoning_perf*.py, which sent whole texts to two vLLM
servers and relied on prefix caching):

* Each model keeps its own KV cache and is fed only the text it has not seen (incremental prefill); a
  rollback crops the cache (``DynamicCache.crop``: a view, no copy) instead of re-sending the history. The probe
  runs on the small model's own cache, shared by reference: the prefixes go in as one token tree with a 4D mask
  (``prefix_probe``), the cache is cropped back afterwards, and the KV of the row the controller keeps is
  appended, so the small model never prefills the big model's text twice and the history is never copied per
  row (``probe_kv="copy"``, a batch with the history copied into every row, is kept to measure against).
* The two models may use different tokenizers: handoff is at the text level (each model tokenizes the new
  text itself), and the big model never sees the tags or the tag hint in its prompt (as in the original).
* Fixed: one version of the original scanned the probes from the longest prefix down but indexed the prefix
  list from the front (``enumerate(reversed(probes))`` then ``prefixes[idx]``), so it kept the mirror-image
  prefix, not the one whose probe closed the tag. Here one index names both the probe and its prefix.
* The random-switch baseline counts the tokens actually generated (the original added the chunk size even
  when a model stopped early) and is seeded.

Modes: ``small`` (small model only), ``big`` (big model only), ``random`` (each step the big model is chosen
with p = 1 / (switch_ratio + 1), chunks of ``switch_chunk`` tokens), ``tags`` (the learned tags).
Accounting per model: prefill tokens (new text fed), decode tokens (kept / rolled back), probe tokens, and
wall time per phase; ``big_fraction`` = big-model tokens kept / all generated tokens kept.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch

from .prefix_probe import crop_, probe_prefixes
from .rewards import BIG_CLOSE, BIG_OPEN

CLOSE_PROBE = "</big"  # a probe that writes this wants the big segment to end
MODES = ("small", "big", "random", "tags")
PROBE_KV = ("shared", "copy")  # prefix probes over the history shared by reference (a token tree) / copied per row


# ---------------------------------------------------------------------------------------------- KV helpers
def _kv_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _make_cache(pairs):
    from transformers import DynamicCache

    try:
        return DynamicCache(ddp_cache_data=pairs)
    except TypeError:  # older transformers
        return DynamicCache.from_legacy_cache(tuple(pairs))


def _cache_select(cache, rows: torch.Tensor, positions: torch.Tensor | None = None):
    """A new cache with the given batch rows (and sequence positions); the input cache is left untouched."""
    out = []
    for k, v in _kv_pairs(cache):
        k, v = k[rows], v[rows]
        if positions is not None:
            k, v = k[:, :, positions], v[:, :, positions]
        out.append((k, v))
    return _make_cache(out)


# ------------------------------------------------------------------------------------------------- stats
@dataclass
class ModelStats:
    prefill_tokens: int = 0    # tokens of new text fed (prompt, the other model's text, tags)
    decode_tokens: int = 0     # tokens this model sampled, end-of-sequence excluded (kept or rolled back)
    rolled_back: int = 0       # sampled tokens discarded at a handoff
    adopted_tokens: int = 0    # small model: tokens whose KV came from the probe row it kept
    pretext_tokens: int = 0    # small model: probe tokens kept before "</bigmodel>" (usually 0)
    probe_prefill_tokens: int = 0  # tokens fed in probe batches (all rows)
    probe_decode_tokens: int = 0   # lookahead tokens sampled in probe batches (all rows)
    forward_calls: int = 0
    context_tokens: int = 0    # length of the model's id list at the end
    prefill_s: float = 0.0
    decode_s: float = 0.0
    probe_s: float = 0.0

    @property
    def kept_tokens(self) -> int:
        return self.decode_tokens - self.rolled_back + self.pretext_tokens


@dataclass
class Generation:
    text: str
    mode: str
    small: ModelStats
    big: ModelStats
    finished: bool  # stopped on an end-of-sequence token (not a length cap)
    segments: list = field(default_factory=list)  # (model, text) in order
    wall_s: float = 0.0

    @property
    def big_fraction(self) -> float:
        total = self.small.kept_tokens + self.big.kept_tokens
        return self.big.kept_tokens / total if total else 0.0

    def summary(self) -> dict:
        out = {"mode": self.mode, "big_fraction": self.big_fraction, "finished": self.finished,
               "wall_s": self.wall_s, "chars": len(self.text)}
        for name, st in (("small", self.small), ("big", self.big)):
            for key in ("prefill_tokens", "decode_tokens", "rolled_back", "adopted_tokens", "probe_prefill_tokens",
                        "probe_decode_tokens", "prefill_s", "decode_s", "probe_s"):
                out[f"{name}_{key}"] = getattr(st, key)
            out[f"{name}_kept_tokens"] = st.kept_tokens
        return out


# ---------------------------------------------------------------------------------------------- session
# end-of-turn / end-of-sequence markers of the common chat formats (ChatML, Llama 3, Gemma, Phi, DeepSeek); one
# token of the vocabulary is enough. "</s>" and "<eos>" count only as special tokens (Gemma's vocabulary has a
# plain "</s>", the HTML tag).
END_OF_TURN_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>",
                       "<|end▁of▁sentence|>")
END_OF_TEXT_SPECIAL = ("</s>", "<eos>")


def _as_ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, torch.Tensor):
        return {int(v) for v in value.flatten().tolist()}
    return {int(v) for v in value}


def _special_ids(tokenizer) -> set[int]:
    ids = set(_as_ids(getattr(tokenizer, "all_special_ids", None) or []))
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i, t in added.items() if getattr(t, "special", False))
    return ids


def _single_token_id(tokenizer, marker: str) -> int | None:
    """The id of ``marker`` when the vocabulary holds it as one token (special or not: transformers 5.17 reads
    Gemma 3's ``<end_of_turn>`` from the GGUF as a plain token)."""
    try:
        ids = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
        if len(ids) != 1:
            return None
        back = tokenizer.convert_ids_to_tokens(ids[0]) if hasattr(tokenizer, "convert_ids_to_tokens") \
            else tokenizer.decode(ids, skip_special_tokens=False)
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: not a marker of this model
        return None
    return int(ids[0]) if back == marker else None


def _template_end_of_turn(tokenizer) -> set[int]:
    """The special tokens the chat template writes right after an assistant message (its end-of-turn)."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    content = "ZQXJ answer"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": content}], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that needs other roles: fall back on the known markers
        return set()
    after = text.split(content, 1)[1] if content in text else ""
    ids = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after else []
    special = _special_ids(tokenizer)
    out = set()
    for i in ids:  # the special tokens before the first plain one ("<|im_end|>" then "\n")
        if i not in special:
            break
        out.add(int(i))
    return out


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """Every id that ends the model's turn: the tokenizer's eos, the generation config's and the model config's
    ``eos_token_id`` (an int or a list), the special tokens the chat template writes after an assistant message,
    and the known end-of-turn markers the vocabulary holds as special tokens. Which of these a converted GGUF
    declares depends on the transformers version (5.17 reads SmolLM2's eos as ``<|im_start|>`` and Qwen2.5's as
    ``<|endoftext|>``, 5.24 both as ``<|im_end|>``), so all are taken."""
    ids = _as_ids(getattr(tokenizer, "eos_token_id", None))
    if model is not None:
        for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
            ids |= _as_ids(getattr(cfg, "eos_token_id", None))
    ids |= _template_end_of_turn(tokenizer)
    for marker in END_OF_TURN_MARKERS + END_OF_TEXT_SPECIAL:
        i = _single_token_id(tokenizer, marker)
        if i is not None and (marker in END_OF_TURN_MARKERS or i in _special_ids(tokenizer)):
            ids.add(i)
    return ids


class Session:
    """One model's view of the shared text: the token ids fed so far, their KV cache, and the logits for the
    next token. ``use_cache=False`` recomputes every step from the whole id list (the reference path)."""

    def __init__(self, name, model, tokenizer, stats: ModelStats, *, use_cache=True, generator=None,
                 temperature=0.0):
        if not callable(getattr(tokenizer, "decode", None)) or not callable(tokenizer):
            raise TypeError(f"{name}: tokenizer must be a Hugging Face tokenizer (callable, with decode)")
        self.name, self.model, self.tok, self.stats = name, model, tokenizer, stats
        self.use_cache, self.generator, self.temperature = use_cache, generator, temperature
        self.ids: list[int] = []
        self.text = ""  # the text those ids stand for (this model's view)
        self.cache = None
        self.next_logits: torch.Tensor | None = None
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.device = next(model.parameters()).device

    # -- low level
    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"]) if text else []

    def dec(self, ids) -> str:
        # no clean-up of spaces: decoded pieces must concatenate to the decoded whole
        return self.tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _forward(self, new_ids: list[int]) -> torch.Tensor:
        """Feed ``new_ids`` after ``self.ids``; returns the logits after the last one."""
        self.stats.forward_calls += 1
        with torch.inference_mode():
            if self.use_cache:
                start = len(self.ids)
                ids = torch.tensor([new_ids], device=self.device)
                pos = torch.arange(start, start + len(new_ids), device=self.device)[None]
                out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                                 logits_to_keep=1)
                self.cache = out.past_key_values
            else:
                full = self.ids + new_ids
                ids = torch.tensor([full], device=self.device)
                pos = torch.arange(len(full), device=self.device)[None]
                out = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=1)
        self.ids = self.ids + list(new_ids)
        return out.logits[0, -1].float()

    def sample(self, logits: torch.Tensor) -> int:
        if self.temperature <= 0:
            return int(torch.argmax(logits))
        # float32 probabilities, drawn on the generator's device (a CPU generator: the same stream on any device)
        probs = torch.softmax(logits.float() / self.temperature, dim=-1)
        if self.generator is not None and probs.device != self.generator.device:
            probs = probs.to(self.generator.device)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    # -- text level
    def catch_up(self, view: str) -> None:
        """Prefill the part of ``view`` this model has not seen yet."""
        if not view.startswith(self.text):
            raise RuntimeError(f"{self.name}: shared text was rewritten behind the model's back "
                               f"(fed {len(self.text)} chars that are no longer a prefix of the view)")
        delta = view[len(self.text):]
        new_ids = self.encode(delta)
        if new_ids:
            t0 = time.perf_counter()
            self.next_logits = self._forward(new_ids)
            self.stats.prefill_tokens += len(new_ids)
            self.stats.prefill_s += time.perf_counter() - t0
        self.text = view

    def decode(self, max_tokens: int, stop_text: str | None = None) -> tuple[list[int], str, bool]:
        """Sample up to ``max_tokens``; stop at an end-of-sequence token (returns True) or once the new text
        contains ``stop_text``. Returns (ids, text, hit_eos); the text is appended to this model's view."""
        if self.next_logits is None:
            raise RuntimeError(f"{self.name}: nothing fed yet (call catch_up with the prompt first)")
        t0 = time.perf_counter()
        new: list[int] = []
        eos = False
        for _ in range(max_tokens):
            tok = self.sample(self.next_logits)
            if tok in self.stop_ids:
                eos = True
                break
            self.next_logits = self._forward([tok])
            new.append(tok)
            self.stats.decode_tokens += 1
            # the tag is plain text: look for it in the decoded tail (a tag is at most ~10 tokens)
            if stop_text is not None and stop_text in self.dec(new[-16:]):
                break
        text = self.dec(new) if new else ""
        self.text += text
        self.stats.decode_s += time.perf_counter() - t0
        return new, text, eos

    def rollback(self, n_tokens: int, text: str, next_logits: torch.Tensor) -> None:
        """Forget the last ``n_tokens`` ids; ``text`` is the view they leave, ``next_logits`` what follows."""
        if n_tokens:
            self.ids = self.ids[:-n_tokens]
            if self.use_cache:  # a view of the first positions, no copy of the history
                crop_(self.cache, n_tokens)
        self.text = text
        self.next_logits = next_logits


# ------------------------------------------------------------------------------------------- controller
def _strip_tags(text: str) -> str:
    return text.replace(BIG_OPEN, "").replace(BIG_CLOSE, "")


class Controller:
    """Run one of the four modes over a (small, big) pair of (model, tokenizer)."""

    def __init__(self, small, big, *, chunk_tokens: int = 64, probe_tokens: int = 8, max_big_segment: int = 512,
                 max_new_tokens: int = 16384, temperature: float = 0.0, seed: int = 0, use_cache: bool = True,
                 switch_ratio: int = 19, switch_chunk: int = 32, probe_kv: str = "shared"):
        for name, pair in (("small", small), ("big", big)):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise TypeError(f"{name} must be a (model, tokenizer) tuple")
        for name, v in (("chunk_tokens", chunk_tokens), ("probe_tokens", probe_tokens),
                        ("max_big_segment", max_big_segment), ("max_new_tokens", max_new_tokens),
                        ("switch_chunk", switch_chunk)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(switch_ratio, (int, float)) or switch_ratio < 0:
            raise ValueError(f"switch_ratio must be >= 0 (p_big = 1 / (ratio + 1)), got {switch_ratio!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if probe_kv not in PROBE_KV:
            raise ValueError(f"probe_kv must be one of {PROBE_KV}, got {probe_kv!r}")
        self.probe_kv = probe_kv
        self.small, self.big = small, big
        self.chunk_tokens, self.probe_tokens = chunk_tokens, probe_tokens
        self.max_big_segment, self.max_new_tokens = max_big_segment, max_new_tokens
        self.temperature, self.seed, self.use_cache = temperature, seed, use_cache
        self.switch_ratio, self.switch_chunk = switch_ratio, switch_chunk

    def _session(self, which: str, stats: ModelStats, seed_offset: int) -> Session:
        model, tok = self.small if which == "small" else self.big
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1000 + seed_offset)
        return Session(which, model, tok, stats, use_cache=self.use_cache, generator=gen,
                       temperature=self.temperature)

    def generate(self, small_prompt: str, big_prompt: str | None = None, mode: str = "tags") -> Generation:
        """Write one completion. ``small_prompt`` is what the small model sees before the completion (with the
        tag hint for ``tags``); ``big_prompt`` the big model's (default: the small prompt)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(small_prompt, str) or not small_prompt:
            raise ValueError("small_prompt must be a non-empty string")
        big_prompt = small_prompt if big_prompt is None else big_prompt
        st_small, st_big = ModelStats(), ModelStats()
        small, big = self._session("small", st_small, 1), self._session("big", st_big, 2)
        t0 = time.perf_counter()
        run = {"small": self._run_single, "big": self._run_single, "random": self._run_random,
               "tags": self._run_tags}[mode]
        text, finished, segments = run(mode, small, big, small_prompt, big_prompt)
        st_small.context_tokens, st_big.context_tokens = len(small.ids), len(big.ids)
        return Generation(text, mode, st_small, st_big, finished, segments, time.perf_counter() - t0)

    # -- modes
    def _budget(self, small: Session, big: Session) -> int:
        return self.max_new_tokens - small.stats.kept_tokens - big.stats.kept_tokens

    def _run_single(self, mode, small, big, small_prompt, big_prompt):
        sess, prompt = (small, small_prompt) if mode == "small" else (big, big_prompt)
        sess.catch_up(prompt)
        _, text, eos = sess.decode(self.max_new_tokens)
        return text, eos, [(mode, text)]

    def _run_random(self, mode, small, big, small_prompt, big_prompt):
        rng = random.Random(self.seed)
        p_big = 1.0 / (self.switch_ratio + 1.0)
        completion, segments = "", []
        while True:
            budget = self._budget(small, big)
            if budget <= 0:
                return completion, False, segments
            use_big = rng.random() < p_big
            sess, prompt = (big, big_prompt) if use_big else (small, small_prompt)
            sess.catch_up(prompt + completion)
            _, text, eos = sess.decode(min(self.switch_chunk, budget))
            completion += text
            segments.append((sess.name, text))
            if eos:
                return completion, True, segments

    def _run_tags(self, mode, small, big, small_prompt, big_prompt):
        completion, segments = "", []
        big_view = lambda: big_prompt + _strip_tags(completion)  # noqa: E731
        while True:
            # ---- small model until it writes <bigmodel>
            budget = self._budget(small, big)
            if budget <= 0:
                return completion, False, segments
            small.catch_up(small_prompt + completion)
            _, text, eos = small.decode(budget, stop_text=BIG_OPEN)
            completion += text
            segments.append(("small", text))
            if eos:
                return completion, True, segments
            if BIG_OPEN not in text:
                return completion, False, segments  # ran out of budget
            # ---- big model in chunks, probed after each chunk
            seg = 0
            while True:
                budget = self._budget(small, big)
                if budget <= 0:
                    return completion, False, segments
                if seg >= self.max_big_segment:
                    completion += BIG_CLOSE
                    segments.append(("cap", BIG_CLOSE))
                    break
                big.catch_up(big_view())
                logits_before, text_before = big.next_logits, big.text
                n = min(self.chunk_tokens, self.max_big_segment - seg, budget)
                chunk_logits = []
                ids, chunk_text, eos = self._decode_logged(big, n, chunk_logits)
                seg += len(ids)
                if eos or not ids:
                    completion += chunk_text
                    segments.append(("big", chunk_text))
                    return completion, True, segments
                handoff = self._probe(small, small_prompt + completion, big, ids)
                if handoff is None:
                    completion += chunk_text
                    segments.append(("big", chunk_text))
                    continue
                r, prefix_text, pretext = handoff
                dropped = len(ids) - r
                big.stats.rolled_back += dropped
                big.rollback(dropped, text_before + prefix_text,
                             chunk_logits[r - 1] if r > 0 else logits_before)
                completion += prefix_text
                segments.append(("big", prefix_text))
                if pretext:
                    small.stats.pretext_tokens += len(small.encode(pretext))
                    segments.append(("small", pretext))
                completion += pretext + BIG_CLOSE
                break

    @staticmethod
    def _decode_logged(sess: Session, n: int, logits_log: list) -> tuple[list[int], str, bool]:
        """Like Session.decode, but keeps the logits after each fed token (to resume after a rollback)."""
        t0 = time.perf_counter()
        new, eos = [], False
        for _ in range(n):
            tok = sess.sample(sess.next_logits)
            if tok in sess.stop_ids:
                eos = True
                break
            sess.stats.decode_tokens += 1
            sess.next_logits = sess._forward([tok])
            logits_log.append(sess.next_logits)
            new.append(tok)
        text = sess.dec(new) if new else ""
        sess.text += text
        sess.stats.decode_s += time.perf_counter() - t0
        return new, text, eos

    def _probe(self, small: Session, small_view_before: str, big: Session, chunk_ids: list[int]):
        """Probe the small model after every prefix of the big chunk (one batch). Returns None, or
        (prefix length r in big tokens, prefix text, the probe's text before ``</big``)."""
        t0 = time.perf_counter()
        small.catch_up(small_view_before)
        rows, texts = [], []
        for r in range(1, len(chunk_ids) + 1):
            text = big.dec(chunk_ids[:r])
            if text.endswith("\ufffd"):
                continue  # the prefix ends inside a multi-byte character: not a place to hand off
            rows.append(r)
            texts.append(text)
        if not rows or rows[-1] != len(chunk_ids):
            rows.append(len(chunk_ids))
            texts.append(big.dec(chunk_ids))
        row_ids = [small.encode(t) for t in texts]
        if self.use_cache and self.probe_kv == "shared":
            probes, first_logits, row_caches = self._probe_shared(small, row_ids)
        elif self.use_cache:
            probes, first_logits, row_caches = self._probe_batched(small, row_ids)
        else:
            probes, first_logits, row_caches = self._probe_reference(small, row_ids), None, None
        small.stats.probe_prefill_tokens += sum(len(x) for x in row_ids)
        small.stats.probe_s += time.perf_counter() - t0
        choice = None
        for i in range(len(rows) - 1, -1, -1):  # longest prefix first; i indexes rows, texts and probes alike
            probe_text = small.dec(probes[i])
            if CLOSE_PROBE in probe_text:
                choice = i
                break
        keep = choice if choice is not None else len(rows) - 1
        # the small model adopts the kept row: it has now seen the chunk's text up to that prefix
        self._adopt(small, row_ids[keep], small_view_before + texts[keep],
                    None if first_logits is None else first_logits[keep],
                    None if row_caches is None else row_caches(keep))
        if choice is None:
            return None
        pretext = small.dec(probes[choice]).split(CLOSE_PROBE, 1)[0]
        return rows[choice], texts[choice], pretext

    def _adopt(self, small: Session, new_ids, text, logits, cache) -> None:
        """The small model takes over the kept probe row: the probe already fed these tokens."""
        if self.use_cache:
            small.cache, small.next_logits = cache, logits  # shared: the same cache, the row's KV appended
            small.ids = small.ids + list(new_ids)
        elif new_ids:
            small.next_logits = small._forward(list(new_ids))
        small.stats.adopted_tokens += len(new_ids)
        small.text = text

    def _probe_shared(self, small: Session, row_ids: list[list[int]]):
        """All probe rows as one token tree over the small model's cache, shared by reference
        (``prefix_probe``); adopting row i appends its KV to that same cache."""
        res = probe_prefixes(small.model, small.cache, row_ids, small.next_logits, k=self.probe_tokens,
                             sample=small.sample, stop_ids=small.stop_ids)
        small.stats.forward_calls += res.forwards
        small.stats.probe_decode_tokens += sum(len(p) for p in res.probes)

        def row_cache(i: int):
            res.adopt_(small.cache, i)
            return small.cache

        return res.probes, res.first_logits, row_cache

    def _probe_batched(self, small: Session, row_ids: list[list[int]]):
        """The naive path (``probe_kv="copy"``), kept to measure against: the history is copied into every
        row of the batch (R x the KV cache). All probe rows in one batch on top of the small model's cache: row i is
        [shared past][pads][row i's new tokens], pads masked, positions continuous per row."""
        dev, k = small.device, self.probe_tokens
        n_rows, past = len(row_ids), len(small.ids)
        width = max(1, max(len(x) for x in row_ids))
        ids = torch.zeros((n_rows, width), dtype=torch.long, device=dev)
        mask = torch.zeros((n_rows, past + width), dtype=torch.long, device=dev)
        mask[:, :past] = 1
        pos = torch.zeros((n_rows, width), dtype=torch.long, device=dev)
        for i, x in enumerate(row_ids):
            if x:
                ids[i, width - len(x):] = torch.tensor(x, device=dev)
                mask[i, past + width - len(x):] = 1
                pos[i, width - len(x):] = torch.arange(past, past + len(x), device=dev)
        lengths = torch.tensor([len(x) for x in row_ids], device=dev)
        base = _cache_select(small.cache, torch.zeros(n_rows, dtype=torch.long, device=dev))
        with torch.inference_mode():
            out = small.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=base,
                              use_cache=True, logits_to_keep=1)
        small.stats.forward_calls += 1
        logits = out.logits[:, -1].float()
        # a row with no new tokens continues from the small model's current logits
        empty = lengths == 0
        if empty.any():
            logits[empty] = small.next_logits
        first_logits = logits.clone()
        # the cache right after the prefill, before any lookahead token (for _adopt); later steps concatenate
        # into new tensors, so these references stay as they are
        prefill_kv = list(_kv_pairs(out.past_key_values))
        cache = out.past_key_values
        probes = [[] for _ in range(n_rows)]
        done = torch.zeros(n_rows, dtype=torch.bool, device=dev)
        next_pos = past + lengths
        for step in range(k):
            toks = torch.stack([torch.tensor(small.sample(logits[i]), device=dev) for i in range(n_rows)])
            for i in range(n_rows):
                if not done[i]:
                    if int(toks[i]) in small.stop_ids:
                        done[i] = True
                    else:
                        probes[i].append(int(toks[i]))
            small.stats.probe_decode_tokens += int((~done).sum())
            if step == k - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((n_rows, 1), dtype=torch.long, device=dev)], dim=1)
            with torch.inference_mode():
                out = small.model(input_ids=toks[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                                  past_key_values=cache, use_cache=True, logits_to_keep=1)
            small.stats.forward_calls += 1
            cache, logits = out.past_key_values, out.logits[:, -1].float()
            next_pos = next_pos + 1

        def row_cache(i: int):
            n_new = int(lengths[i])
            keep = torch.cat([torch.arange(past, device=dev),
                              torch.arange(past + width - n_new, past + width, device=dev)])
            return _cache_select(_make_cache(prefill_kv), torch.tensor([i], device=dev), keep)

        return probes, first_logits, row_cache

    def _probe_reference(self, small: Session, row_ids: list[list[int]]) -> list[list[int]]:
        """The same probes, one row at a time, recomputing from the whole id list (no cache)."""
        probes = []
        for x in row_ids:
            ids = small.ids + list(x)
            out_ids: list[int] = []
            for _ in range(self.probe_tokens):
                with torch.inference_mode():
                    t = torch.tensor([ids], device=small.device)
                    logits = small.model(input_ids=t, position_ids=torch.arange(len(ids), device=small.device)[None],
                                         use_cache=False, logits_to_keep=1).logits[0, -1].float()
                small.stats.forward_calls += 1
                tok = small.sample(logits)
                if tok in small.stop_ids:
                    break
                out_ids.append(tok)
                ids.append(tok)
            small.stats.probe_decode_tokens += len(out_ids)
            probes.append(out_ids)
        return probes
