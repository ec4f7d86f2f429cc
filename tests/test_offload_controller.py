"""The two-model controller on tiny random models: KV caches reused, outputs equal the no-cache reference."""

import pytest
import torch
from torch import nn

from effllm_lib.offload.controller import Controller

CORPUS = ["the big model writes the hard part of the reasoning and the small model the rest " * 3,
          "add 12 and 30 to get 42; then divide by 2 to get 21. " * 3,
          "<think>\nfirst, we compute the answer step by step\n</think>\n<answer>\n\\boxed{42}\n</answer>"]


def make_tokenizer(vocab_size: int, tags: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)
    if tags:  # one token per tag makes them easy to force; the controller still matches them as text
        fast.add_tokens(["<bigmodel>", "</bigmodel>"])
    return fast


class Forced(nn.Module):
    """A model whose next token is forced at given absolute positions; the end-of-sequence token and the tag
    tokens are banned elsewhere (random tiny models would emit them at random)."""

    def __init__(self, inner, forced: dict[int, int], banned: list[int]):
        super().__init__()
        self.inner, self.forced, self.banned = inner, forced, banned

    def forward(self, input_ids, position_ids, **kw):
        out = self.inner(input_ids=input_ids, position_ids=position_ids, **kw)
        logits = out.logits
        logits[..., self.banned] -= 1e4
        # every kept logit row, by its own position (a token-tree probe keeps logits at many positions)
        nxt = position_ids[:, -logits.shape[1]:] + 1
        for b in range(logits.shape[0]):
            for t in range(logits.shape[1]):
                tok = self.forced.get(int(nxt[b, t]))
                if tok is not None:
                    logits[b, t, tok] += 2e4
        return out


def tiny(config_cls, tok, seed):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, tie_word_embeddings=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="sdpa")
    # random init is near-uniform; widen the logits so greedy choices are far from ties
    with torch.no_grad():
        model.lm_head.weight.mul_(50)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toks():
    return make_tokenizer(300, tags=True), make_tokenizer(280, tags=False)


def non_ascii(tok) -> list[int]:
    """Ids whose text is not ASCII: byte pieces of multi-byte characters would make prefixes end inside a
    character, which the controller (rightly) never hands off at; tests want every prefix to be a candidate."""
    return [i for i in range(len(tok)) if not tok.decode([i]).isascii()]


def pair(toks, forced_small, same_tokenizer=False):
    from transformers import LlamaConfig, Qwen2Config

    tok_s, tok_b = toks
    if same_tokenizer:
        tok_b = tok_s
    open_id, close_id = tok_s.convert_tokens_to_ids(["<bigmodel>", "</bigmodel>"])
    small = Forced(tiny(LlamaConfig, tok_s, 0), forced_small,
                   [tok_s.eos_token_id, open_id, close_id] + non_ascii(tok_s))
    banned_b = [tok_b.eos_token_id] + ([open_id, close_id] if same_tokenizer else []) + non_ascii(tok_b)
    big = Forced(tiny(Qwen2Config, tok_b, 1), {}, banned_b)
    return (small, tok_s), (big, tok_b), open_id, close_id


PROMPT_S = "question: add 12 and 30. You always use <bigmodel>...</bigmodel> for the hard parts.\n<think>\n"
PROMPT_B = "question: add 12 and 30.\n<think>\n"


def test_small_only_counts_and_reference(toks):
    (small, tok_s), big, _, _ = pair(toks, {})
    n_prompt = len(tok_s(PROMPT_S, add_special_tokens=False)["input_ids"])
    outs = []
    for use_cache in (True, False):
        ctl = Controller((small, tok_s), big, max_new_tokens=20, use_cache=use_cache)
        outs.append(ctl.generate(PROMPT_S, PROMPT_B, mode="small"))
    cached, ref = outs
    assert cached.text == ref.text and len(cached.text) > 0
    assert cached.small.prefill_tokens == n_prompt        # the prompt, once
    assert cached.small.decode_tokens == 20
    assert cached.small.forward_calls == 1 + 20            # one prefill, one call per token
    assert cached.big.prefill_tokens == 0 and cached.big_fraction == 0.0


def run_tags(toks, use_cache, forced, same_tokenizer=False, **kw):
    small, big, open_id, close_id = pair(toks, {}, same_tokenizer)
    small[0].forced = {p: (open_id if t == "open" else close_id) for p, t in forced.items()}
    params = dict(chunk_tokens=8, probe_tokens=3, max_big_segment=24, max_new_tokens=70)
    params.update(kw)
    return Controller(small, big, use_cache=use_cache, **params).generate(PROMPT_S, PROMPT_B, mode="tags")


@pytest.mark.parametrize("probe_kv", ["shared", "copy"])
@pytest.mark.parametrize("same_tokenizer", [True, False])
def test_tags_mode_equals_no_cache_reference(toks, same_tokenizer, probe_kv):
    n_prompt = len(toks[0](PROMPT_S, add_special_tokens=False)["input_ids"])
    forced = {n_prompt + 5: "open", n_prompt + 16: "close", n_prompt + 30: "open", n_prompt + 33: "close"}
    cached = run_tags(toks, True, forced, same_tokenizer, probe_kv=probe_kv)
    ref = run_tags(toks, False, forced, same_tokenizer)
    assert cached.text == ref.text
    assert cached.segments == ref.segments
    assert cached.big_fraction == pytest.approx(ref.big_fraction)
    assert cached.text.count("<bigmodel>") == 2 and cached.text.count("</bigmodel>") == 2
    assert 0 < cached.big_fraction < 1


def test_kv_cache_reuse_feeds_each_token_once(toks):
    n_prompt = len(toks[0](PROMPT_S, add_special_tokens=False)["input_ids"])
    forced = {n_prompt + 5: "open", n_prompt + 16: "close", n_prompt + 30: "open", n_prompt + 33: "close"}
    g = run_tags(toks, True, forced, same_tokenizer=False)
    s, b = g.small, g.big
    # every token in each model's final context was fed exactly once: no history is re-sent
    assert s.prefill_tokens + s.decode_tokens + s.adopted_tokens == s.context_tokens
    assert b.prefill_tokens + b.decode_tokens - b.rolled_back == b.context_tokens
    n_big_prompt = len(toks[1](PROMPT_B, add_special_tokens=False)["input_ids"])
    assert b.prefill_tokens < n_big_prompt + s.decode_tokens + 10  # prompt + the small model's text, once
    # the no-cache reference re-reads the whole context on every call
    assert b.forward_calls <= 2 * b.decode_tokens


def test_handoff_keeps_the_prefix_whose_probe_closed(toks):
    # same tokenizer: the probe of prefix r starts at small position S0 + r, where S0 = open position + 1.
    # Forcing "</bigmodel>" at S0 + 5 makes prefix 5 (of an 8-token chunk) the longest whose 3-token lookahead
    # closes the tag, with nothing before the tag: 5 big tokens kept, 3 rolled back. The original's
    # mirrored index would have kept 8 - 5 = 3 (or 2) tokens.
    n_prompt = len(toks[0](PROMPT_S, add_special_tokens=False)["input_ids"])
    p_open = n_prompt + 4
    g = run_tags(toks, True, {p_open: "open", p_open + 1 + 5: "close"}, same_tokenizer=True, max_new_tokens=30)
    big_segments = [t for who, t in g.segments if who == "big"]
    assert len(big_segments) == 1
    assert g.big.kept_tokens == 5 and g.big.rolled_back == 3
    assert g.small.pretext_tokens == 0
    assert g.text.count("</bigmodel>") == 1
    assert g.text.split("<bigmodel>", 1)[1].split("</bigmodel>", 1)[0] == big_segments[0]


def test_segment_cap_closes_the_tag(toks):
    n_prompt = len(toks[0](PROMPT_S, add_special_tokens=False)["input_ids"])
    g = run_tags(toks, True, {n_prompt + 2: "open"}, max_big_segment=12, max_new_tokens=40)
    assert ("cap", "</bigmodel>") in g.segments
    assert g.big.kept_tokens == 12


def test_random_switch(toks):
    small, big, _, _ = pair(toks, {})
    a = Controller(small, big, max_new_tokens=60, switch_ratio=1, switch_chunk=8, seed=3).generate(
        PROMPT_B, mode="random")
    b = Controller(small, big, max_new_tokens=60, switch_ratio=1, switch_chunk=8, seed=3).generate(
        PROMPT_B, mode="random")
    assert a.text == b.text and a.segments == b.segments            # seeded
    assert a.small.kept_tokens + a.big.kept_tokens == 60              # actual tokens, not chunks x 8
    big_tokens = sum(len(toks[1](t, add_special_tokens=False)["input_ids"]) for w, t in a.segments if w == "big")
    assert a.big.kept_tokens > 0 and a.small.kept_tokens > 0
    assert a.big_fraction == pytest.approx(a.big.kept_tokens / 60)
    assert big_tokens >= 1


def test_bad_inputs(toks):
    small, big, _, _ = pair(toks, {})
    with pytest.raises(ValueError, match="mode"):
        Controller(small, big).generate("x", mode="speculative")
    with pytest.raises(ValueError, match="chunk_tokens"):
        Controller(small, big, chunk_tokens=0)
    with pytest.raises(TypeError, match="tuple"):
        Controller(small[0], big)
    with pytest.raises(ValueError, match="small_prompt"):
        Controller(small, big).generate("")
