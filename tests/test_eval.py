"""Perplexity and multiple-choice scoring against slow, position-by-position references on a tiny Llama."""

import math

import pytest
import torch

from effllm_lib import eval as E

pytestmark = pytest.mark.usefixtures("one_thread")



class CharTokenizer:
    """One token per character (ids 2..), BOS = 1; mimics the bits of a HF tokenizer that eval uses."""

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos
        self.bos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (ord(c) % 40) for c in text]
        return {"input_ids": ([1] if add_special_tokens and self.adds_bos else []) + ids}


def tiny_llama(seed=0, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


TEXT = "the quick brown fox jumps over the lazy dog; " * 4


def test_windows_hand_cases():
    ids = list(range(10))
    w, total = E.windows(ids, 4)
    assert total == 2 and w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    w, total = E.windows(ids, 4, bos_id=99)
    assert total == 3 and w.tolist() == [[99, 0, 1, 2], [99, 3, 4, 5], [99, 6, 7, 8]]
    w, total = E.windows(list(range(20)), 2, max_windows=3)  # 10 windows, keep 0, 4 (4.5 rounds to even), 9
    assert total == 10 and w[:, 0].tolist() == [0, 8, 18]


def reference_ppl(model, tok, text, seq_len, bos):
    """Token by token: the model sees the prefix and scores the next token; no shifting tricks."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = seq_len - bos
    nll, n = 0.0, 0
    for w in range(len(ids) // body):
        window = ([1] if bos else []) + ids[w * body:(w + 1) * body]
        for t in range(1, len(window)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([window[:t]])).logits[0, -1]
            nll -= torch.log_softmax(logits.double(), -1)[window[t]].item()
            n += 1
    return math.exp(nll / n), n


@pytest.mark.parametrize("adds_bos", [False, True])
def test_perplexity_equals_token_by_token_reference(adds_bos):
    model, tok = tiny_llama(), CharTokenizer(adds_bos)
    text = TEXT[:60]  # 3 windows of 16 (or 4 of 15 + BOS)
    res = E.perplexity(model, tok, text, seq_len=16, progress=False)
    ref, n = reference_ppl(model, tok, text, 16, adds_bos)
    assert res.bos is adds_bos and res.tokens == n
    assert res.ppl == pytest.approx(ref, rel=1e-4)


def test_uniform_model_has_perplexity_vocab_size():
    model = tiny_llama(vocab=48)
    torch.nn.init.zeros_(model.lm_head.weight)  # every logit 0 -> uniform over the 48 tokens
    res = E.perplexity(model, CharTokenizer(False), TEXT, seq_len=8, progress=False)
    assert res.ppl == pytest.approx(48.0, rel=1e-5)


def test_seq_len_defaults_to_model_maximum():
    model = tiny_llama()
    assert E.model_max_length(model) == 64 and E.model_max_length(model, cap=16) == 16
    assert E.perplexity(model, CharTokenizer(False), TEXT, progress=False).seq_len == 64


TASK = {
    "task_prefix": "Answer:",
    "examples": [
        {"input": "2+2?", "target_scores": {"4": 1, "5": 0, "22": 0}},
        {"input": "sky?", "target_scores": {"blue": 1, "azure": 1, "green": 0}},
        {"input": "free text", "target": "no scores here"},
        {"input": "x?", "target_scores": {"a": 0, "b": 0}},  # no gold answer: skipped
    ],
}


def test_bigbench_parsing():
    ex = E.bigbench_multiple_choice(TASK)
    assert len(ex) == 2
    assert ex[0].prompt == "Answer:\nQ: 2+2?\nA:" and ex[0].choices == ["4", "5", "22"] and ex[0].gold == {0}
    assert ex[1].gold == {0, 1}
    assert E.bigbench_multiple_choice(TASK, max_examples=1, seed=3) == E.bigbench_multiple_choice(TASK, 1, 3)
    with pytest.raises(ValueError, match="no multiple-choice"):
        E.bigbench_multiple_choice({"examples": [{"input": "a", "target": "b"}]})


@pytest.mark.parametrize("adds_bos", [False, True])
def test_choice_logprobs_equal_unpadded_reference(adds_bos):
    model, tok = tiny_llama(seed=1), CharTokenizer(adds_bos)
    ex = E.bigbench_multiple_choice(TASK)[0]
    got = E.choice_logprobs(model, tok, ex)
    for lp, choice in zip(got, ex.choices):
        prompt = ([1] if adds_bos else []) + tok(ex.prompt, add_special_tokens=False)["input_ids"]
        answer = tok(" " + choice, add_special_tokens=False)["input_ids"]
        ref = 0.0
        for t in range(len(answer)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + answer[:t]])).logits[0, -1]
            ref += torch.log_softmax(logits.double(), -1)[answer[t]].item()
        assert lp == pytest.approx(ref, abs=1e-4)


def test_accuracy_counts_against_the_scores():
    model, tok = tiny_llama(seed=2), CharTokenizer(False)
    examples = E.bigbench_multiple_choice(TASK)
    res = E.multiple_choice_accuracy(model, tok, examples, progress=False)
    expected = []
    for ex in examples:
        lp = E.choice_logprobs(model, tok, ex)
        expected.append(lp.index(max(lp)) in ex.gold)
    assert res.correct == expected and res.accuracy == sum(expected) / 2
    assert res.chance == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_bad_inputs_raise():
    model = tiny_llama()
    with pytest.raises(ValueError, match="non-empty"):
        E.perplexity(model, CharTokenizer(False), "  ")
    with pytest.raises(ValueError, match="fewer than one window"):
        E.perplexity(model, CharTokenizer(False), "short", seq_len=32, progress=False)
    with pytest.raises(ValueError, match="bos must be"):
        E.perplexity(model, CharTokenizer(False), TEXT, bos="yes")
    tok = CharTokenizer(False)
    tok.bos_token_id = None
    with pytest.raises(ValueError, match="no bos_token_id"):
        E.perplexity(model, tok, TEXT, bos=True)
    with pytest.raises(ValueError, match="seq_len"):
        E.windows([1, 2, 3], 1)
    with pytest.raises(ValueError, match="no examples"):
        E.multiple_choice_accuracy(model, tok, [])


def test_pretokenized_ids_give_the_same_result():
    model, tok = tiny_llama(), CharTokenizer(False)
    a = E.perplexity(model, tok, TEXT, seq_len=16, progress=False)
    b = E.perplexity(model, tok, "", seq_len=16, progress=False, token_ids=tok(TEXT, add_special_tokens=False)["input_ids"])
    assert a.ppl == b.ppl and a.tokens == b.tokens


# ------------------------------------------------------------------------------------------ KL divergence
def reference_window_scores(model, ref, window):
    """Position by position on the growing prefix, in float64, KL summed over the vocabulary by a loop."""
    nll = kl = 0.0
    same = 0
    for t in range(1, len(window)):
        with torch.no_grad():
            q = torch.log_softmax(model(input_ids=torch.tensor([window[:t]])).logits[0, -1].double(), -1)
            p = torch.log_softmax(ref(input_ids=torch.tensor([window[:t]])).logits[0, -1].double(), -1)
        nll -= q[window[t]].item()
        kl += sum(math.exp(p[v].item()) * (p[v].item() - q[v].item()) for v in range(p.numel()))
        same += int(p.argmax() == q.argmax())
    return nll, kl, same


def test_window_scores_equal_brute_force_kl():
    ref, model = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():  # a perturbed copy: what quantization does
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    windows = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    res = E.window_scores(model, windows, reference=ref, kl_windows=[0, 2], batch_size=2, progress=False)
    assert res.tokens.tolist() == [8, 8, 8]
    for w in range(3):
        nll, kl, same = reference_window_scores(model, ref, windows[w].tolist())
        assert res.nll_sum[w].item() == pytest.approx(nll, rel=1e-5)
        if w == 1:
            assert math.isnan(res.kl_sum[w]) and math.isnan(res.top1_same[w])
        else:
            assert res.kl_sum[w].item() == pytest.approx(kl, rel=1e-4, abs=1e-7) and kl > 0
            assert res.top1_same[w].item() == same
    # the reference against itself: KL 0, every argmax the same
    self_kl = E.window_scores(ref, windows, reference=ref, progress=False)
    assert self_kl.kl_sum.abs().max() < 1e-5 and self_kl.top1_same.tolist() == [8, 8, 8]


def test_window_scores_bad_input():
    model = tiny_llama()
    with pytest.raises(ValueError, match="windows"):
        E.window_scores(model, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="kl_windows"):
        E.window_scores(model, torch.zeros(2, 4, dtype=torch.long), reference=model, kl_windows=[5])


def test_window_scores_with_kept_reference_logits_equal_the_reference_model():
    ref, model = tiny_llama(seed=0), tiny_llama(seed=1)
    windows = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    kept = {}
    E.window_scores(ref, windows, kl_windows=[0, 2], progress=False, keep_logits=kept)
    assert sorted(kept) == [0, 2] and kept[0].shape[0] == 8
    direct = E.window_scores(model, windows, reference=ref, kl_windows=[0, 2], progress=False)
    cached = E.window_scores(model, windows, reference=kept, kl_windows=[0, 2], progress=False)
    assert torch.equal(direct.nll_sum, cached.nll_sum)
    assert torch.allclose(direct.kl_sum.nan_to_num(-1), cached.kl_sum.nan_to_num(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        E.window_scores(model, windows, reference=kept, kl_windows=[1], progress=False)
