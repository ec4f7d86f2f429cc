"""Training-free triggers and the assisted / step-level baselines on tiny random Llama models."""

import math

import pytest
import torch

from effllm_lib.offload.assisted import assisted_generate
from effllm_lib.offload.controller import Controller
from effllm_lib.offload.tiny_chat import tiny_chat_tokenizer
from effllm_lib.offload.triggers import (KINDS, TriggerConfig, TriggerController, _score_text, calibrate_threshold,
                                         handoff_share, threshold_for)

PROMPTS = ["<|im_start|>user\nadd 12 and 30<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nHow many pebbles did Robert end up with?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\n36 onion / 4 onion/minute = ?<|im_end|>\n<|im_start|>assistant\n"]


def tiny_llama(tok, seed, layers=2):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # greedy choices far from ties
        # the end-of-turn token's logit is 0 while the argmax of ~400 random logits is positive: runs never stop
        # early, so windows and spans have their full length
        model.lm_head.weight[tok.eos_token_id] = 0
    return model


@pytest.fixture(scope="module")
def pair():
    tok_small, tok_big = tiny_chat_tokenizer(400), tiny_chat_tokenizer(300)
    return (tiny_llama(tok_small, 1), tok_small), (tiny_llama(tok_big, 2, layers=3), tok_big)


def check_accounting(gen, pair, cfg=None):
    (_, tok_s), (_, tok_b) = pair
    assert "".join(t for _, t, _ in gen.segments) == gen.text
    for who, text, ids in gen.segments:
        tok = tok_s if who == "small" else tok_b
        assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text
    assert sum(len(i) for w, _, i in gen.segments if w == "small") == gen.small.kept_tokens
    assert sum(len(i) for w, _, i in gen.segments if w == "big") == gen.big.kept_tokens
    assert gen.handoffs == sum(1 for w, _, _ in gen.segments if w == "big")
    assert gen.small.kept_tokens + gen.big.kept_tokens <= 48


@pytest.mark.parametrize("kind", KINDS)
def test_handoffs_happen_and_tokens_add_up(pair, kind):
    cfg = TriggerConfig(kind, budget=0.5, threshold=-math.inf, window=8, big_span=6)
    gen = TriggerController(*pair, cfg, max_new_tokens=48).generate(PROMPTS[0])
    assert gen.handoffs > 0 and gen.big.kept_tokens > 0 and gen.small.kept_tokens > 0
    check_accounting(gen, pair)
    if kind != "step":  # fixed-size windows and spans: hand-countable
        assert gen.small.rolled_back == 8 * gen.handoffs
        assert gen.big.kept_tokens == 6 * gen.handoffs
        assert gen.small.decode_tokens == gen.small.kept_tokens + gen.small.rolled_back
    # the guard: a window is handed off only while the running big fraction is below the budget
    assert gen.big_fraction <= 0.5 + 6 / (gen.small.kept_tokens + gen.big.kept_tokens)


@pytest.mark.parametrize("kind", ["entropy", "gap", "step"])
def test_cache_path_equals_no_cache_reference(pair, kind):
    cfg = TriggerConfig(kind, budget=0.6, threshold=-math.inf, window=5, big_span=4)
    a = TriggerController(*pair, cfg, max_new_tokens=40).generate(PROMPTS[1])
    b = TriggerController(*pair, cfg, max_new_tokens=40, use_cache=False).generate(PROMPTS[1])
    assert a.text == b.text and a.handoffs == b.handoffs and a.handoffs > 0
    assert [s[2] for s in a.segments] == [s[2] for s in b.segments]
    for x, y in zip(a.scores, b.scores):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-6)


def test_budget_zero_is_the_small_model_alone(pair):
    gen = TriggerController(*pair, TriggerConfig("gap", budget=0.0, threshold=-math.inf, window=8),
                            max_new_tokens=40).generate(PROMPTS[2])
    ref = Controller(*pair, max_new_tokens=40).generate(PROMPTS[2], mode="small")
    assert gen.text == ref.text and gen.handoffs == 0 and gen.big.kept_tokens == 0
    assert gen.small.kept_tokens == ref.small.kept_tokens == 40


@pytest.mark.parametrize("kind", ["entropy", "margin", "gap", "random"])
def test_budget_moves_offload_monotonically(pair, kind):
    budgets, fractions = [0.0, 0.15, 0.4, 0.8], []
    for b in budgets:
        cfg = TriggerConfig(kind, budget=b, window=6, big_span=6)
        thr, scores = calibrate_threshold(*pair, [(p, p) for p in PROMPTS], cfg, max_new_tokens=48)
        cfg = TriggerConfig(kind, budget=b, threshold=thr, window=6, big_span=6)
        gens = [TriggerController(*pair, cfg, max_new_tokens=48, seed=i).generate(p) for i, p in enumerate(PROMPTS)]
        for g in gens:
            check_accounting(g, pair)
        fractions.append(sum(g.big.kept_tokens for g in gens) / sum(g.big.kept_tokens + g.small.kept_tokens
                                                                     for g in gens))
    assert fractions[0] == 0.0
    assert all(x <= y for x, y in zip(fractions, fractions[1:])), fractions
    assert fractions[-1] > 0.3, fractions


def test_threshold_quantiles_by_hand():
    assert handoff_share(0.5, 16, 16) == pytest.approx(0.5)
    assert handoff_share(0.2, 16, 32) == pytest.approx(3.2 / 28.8)
    assert handoff_share(0.0, 8, 8) == 0.0 and handoff_share(1.0, 8, 8) == 1.0
    # scores 1..10, q = 0.3: the 0.7 quantile with linear interpolation is 1 + 0.7 * 9 = 7.3
    assert threshold_for(range(1, 11), 0.3, 10, 10) == pytest.approx(7.3)
    assert threshold_for([1.0], 0.0, 8, 8) == math.inf
    assert threshold_for([1.0], 1.0, 8, 8) == -math.inf


def test_gap_score_against_full_forward(pair):
    """_score_text's log-likelihood of a span equals a brute-force sum over one full forward without cache."""
    from effllm_lib.offload.controller import ModelStats, Session

    (model, tok) = pair[1]
    sess = Session("big", model, tok, ModelStats())
    sess.catch_up(PROMPTS[0])
    span = "36 onion / 4 = 9 minutes\n"
    lp, n = _score_text(sess, span)
    p_ids = list(tok(PROMPTS[0], add_special_tokens=False)["input_ids"])
    s_ids = list(tok(span, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([p_ids + s_ids])).logits[0].double()
    ref = sum(float(torch.log_softmax(logits[len(p_ids) - 1 + i], -1)[t]) for i, t in enumerate(s_ids))
    assert n == len(s_ids) and lp == pytest.approx(ref, rel=1e-9)
    assert sess.text == PROMPTS[0] + span and sess.ids == p_ids + s_ids


def test_bad_inputs(pair):
    with pytest.raises(ValueError, match="kind"):
        TriggerConfig("magic", 0.1)
    with pytest.raises(ValueError, match="budget"):
        TriggerConfig("entropy", 1.5)
    with pytest.raises(ValueError, match="window"):
        TriggerConfig("entropy", 0.1, window=0)
    with pytest.raises(TypeError, match="TriggerConfig"):
        TriggerController(*pair, {"kind": "entropy"})
    with pytest.raises(ValueError, match="calibration score"):
        threshold_for([], 0.1, 8, 8)
    with pytest.raises(ValueError, match="small_prompt"):
        TriggerController(*pair, TriggerConfig("entropy", 0.1)).generate("")


def greedy_reference(model, tok, prompt, n):
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    out = []
    for _ in range(n):
        with torch.no_grad():
            t = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if t == tok.eos_token_id:
            break
        out.append(t)
    return out


def test_assisted_is_the_big_models_greedy_text(pair):
    (big_model, big_tok) = pair[1]
    res = assisted_generate(pair[0], pair[1], PROMPTS[0], max_new_tokens=20, num_assistant_tokens=4)
    assert res["ids"] == greedy_reference(big_model, big_tok, PROMPTS[0], 20)
    assert res["big_forwards"] >= 1 and res["generated_tokens"] == 20


def test_assisted_with_itself_accepts_every_draft(pair):
    """Drafting with the big model itself: every draft is accepted, so a round yields k + 1 tokens."""
    import copy

    big = pair[1]
    twin = (copy.deepcopy(big[0]), big[1])  # a separate module, so each model's forward hook counts its own calls
    res = assisted_generate(twin, big, PROMPTS[1], max_new_tokens=20, num_assistant_tokens=4)
    assert res["ids"] == greedy_reference(*big, PROMPTS[1], 20)
    assert res["big_forwards"] <= math.ceil(20 / 5) + 1 and res["drafted_share"] >= 0.7
