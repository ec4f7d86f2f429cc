"""Prefix probes over a shared history (token tree + 4D mask) against recomputing every row from scratch."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from effllm_lib.offload.controller import Controller, ModelStats, Session
from effllm_lib.offload.prefix_probe import TokenTree, crop_, probe_prefixes

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def tiny(arch, seed, layers=2):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    cfg = cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # greedy choices far from ties
    return model


def scratch_logits(model, ids):
    """The logits after ``ids``, one forward of the whole list, no cache (the reference)."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def scratch_probe(model, ids, k, stop):
    out = []
    for _ in range(k):
        t = int(torch.argmax(scratch_logits(model, ids)))
        if t in stop:
            break
        out.append(t)
        ids = ids + [t]
    return out


def prefill(model, ids):
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    return out.past_key_values, out.logits[0, -1].float()


def test_token_tree_by_hand():
    tree = TokenTree.build([[5, 6], [5, 6, 7], [5, 8], [], [9]])
    assert tree.tokens == [5, 6, 7, 8, 9]       # 5 and 6 are fed once
    assert tree.depth == [1, 2, 3, 2, 1]
    assert tree.ends == [1, 2, 3, -1, 4]
    assert tree.path(1) == [0, 1, 2] and tree.path(2) == [0, 3] and tree.path(3) == []
    assert tree.ancestors[3].tolist() == [True, False, False, True, False]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_probe_equals_each_row_recomputed(arch):
    model = tiny(arch, 3)
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, VOCAB, (40,), generator=g).tolist()
    chunk = torch.randint(0, VOCAB, (7,), generator=g).tolist()
    # nested prefixes (as a chunk's), a row that branches off, an empty row
    rows = [chunk[:r] for r in range(1, 8)] + [chunk[:3] + [11, 12], []]
    stop = {int(torch.argmax(scratch_logits(model, history + chunk[:2])))}  # row 2 stops at once
    cache, logits = prefill(model, history)
    keys_before = [layer.keys.clone() for layer in cache.layers]
    res = probe_prefixes(model, cache, rows, logits, k=4, sample=lambda x: int(torch.argmax(x)), stop_ids=stop)
    for i, row in enumerate(rows):
        ref = scratch_logits(model, history + row)
        torch.testing.assert_close(res.first_logits[i], ref, rtol=1e-9, atol=1e-9)
        assert res.probes[i] == scratch_probe(model, history + row, 4, stop), i
    assert res.probes[1] == []  # the stop id ends that row's lookahead
    # the history is as it was: same length, same values
    assert cache.get_seq_length() == len(history)
    for layer, before in zip(cache.layers, keys_before):
        torch.testing.assert_close(layer.keys, before, rtol=0, atol=0)
    # adopting a row: the cache continues exactly like a cache of history + row
    n = res.adopt_(cache, 5)
    assert n == 6 and cache.get_seq_length() == len(history) + 6
    with torch.inference_mode():
        nxt = model(input_ids=torch.tensor([[4]]), position_ids=torch.tensor([[len(history) + 6]]),
                    past_key_values=cache, use_cache=True).logits[0, -1].float()
    torch.testing.assert_close(nxt, scratch_logits(model, history + rows[5] + [4]), rtol=1e-9, atol=1e-9)


class LargestTensor(TorchDispatchMode):
    """The largest tensor any op creates (in elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_shared_probe_does_not_copy_the_history_per_row():
    model = tiny("llama", 4)
    history = torch.randint(0, VOCAB, (1500,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [list(range(1, r + 1)) for r in range(1, 17)]  # 16 rows
    kv_elements = 1 * 2 * 1500 * 8  # one layer's keys for the history: batch 1, 2 KV heads, head dim 8
    largest = {}
    for how in ("shared", "copy"):
        cache, logits = prefill(model, history)
        sess = Session("small", model, _Tok(), ModelStats())
        sess.ids, sess.cache, sess.next_logits = list(history), cache, logits
        ctl = Controller((model, _Tok()), (model, _Tok()), probe_tokens=3, probe_kv=how)
        with LargestTensor() as mode:
            (ctl._probe_shared if how == "shared" else ctl._probe_batched)(sess, rows)
        largest[how] = mode.largest
    assert largest["copy"] >= 16 * kv_elements       # the naive path holds 16 copies of the history
    assert largest["shared"] < 2 * 4 * 1500 * 8 * 2  # no more than a few history-sized tensors (GQA repeat)


from effllm_lib.offload.prefix_probe import IdTokenizer as _Tok  # noqa: E402


def test_rollback_crops_in_place():
    model = tiny("llama", 5)
    sess = Session("small", model, _Tok(), ModelStats())
    sess.catch_up("1 2 3 4 5 6 7 8 9 10")
    ptr = sess.cache.layers[0].keys.data_ptr()
    sess.rollback(4, "1 2 3 4 5 6", None)
    assert sess.cache.get_seq_length() == 6 and sess.ids == list(range(1, 7))
    assert sess.cache.layers[0].keys.data_ptr() == ptr  # a view of the same storage: nothing copied
    sess.next_logits = None
    logits = sess._forward([7])
    torch.testing.assert_close(logits, scratch_logits(model, list(range(1, 8))), rtol=1e-9, atol=1e-9)


def test_bad_inputs():
    model = tiny("llama", 6)
    cache, logits = prefill(model, [1, 2, 3])
    greedy = lambda x: int(torch.argmax(x))  # noqa: E731
    with pytest.raises(RuntimeError, match="non-empty cache"):
        probe_prefixes(model, None, [[1]], logits, k=2, sample=greedy, stop_ids=set())
    with pytest.raises(ValueError, match="at least one row"):
        probe_prefixes(model, cache, [], logits, k=2, sample=greedy, stop_ids=set())
    with pytest.raises(ValueError, match="k must be"):
        probe_prefixes(model, cache, [[1]], logits, k=0, sample=greedy, stop_ids=set())
    with pytest.raises(ValueError, match="n_remove"):
        crop_(cache, -1)
    with pytest.raises(ValueError, match="probe_kv"):
        Controller((model, _Tok()), (model, _Tok()), probe_kv="tree")
