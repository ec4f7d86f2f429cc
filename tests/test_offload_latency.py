"""Throughput paths (dynamic / static cache / transformers' generate) and the measured-vs-simulated table."""

import math

import pandas as pd
import pytest
import torch

from effllm_lib.offload.latency import (greedy_decode, generate_decode, latency_table, measure_throughputs,
                                        throughput_of)
from effllm_lib.offload.simulator import Throughput

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(arch, seed):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch](
        vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=119)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float64, attn_implementation="sdpa").eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)          # greedy choices far from ties, and varied
        model.lm_head.weight[119] = 0          # the eos never wins: full-length runs
    return model


def scratch_greedy(model, ids, n):
    """The reference: every step recomputed from the whole id list, no cache."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            t = int(model(input_ids=torch.tensor([ids + out]), use_cache=False).logits[0, -1].argmax())
            out.append(t)
    return out


class Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 100 for c in text]}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_path_writes_the_reference_tokens(arch):
    model = tiny(arch, 1)
    ids = [(7 * i) % 100 for i in range(30)]
    ref = scratch_greedy(model, ids, 12)
    assert len(set(ref)) > 3  # a varied sequence: a path that ignored its cache would differ
    for method in ("dynamic", "static", "static"):  # the second static run reuses the (reset) cache
        got = greedy_decode(model, ids, 12, method)
        assert got["tokens"] == ref, method
        assert got["prefill_s"] > 0 and got["decode_s"] > 0
    assert generate_decode(model, ids, 12)["tokens"] == ref


def test_measure_throughputs_rows_and_bad_input():
    model = tiny("llama", 2)
    t = measure_throughputs(model, Tok(), name="small", methods=("dynamic", "static", "generate"),
                            prompt_tokens=48, decode_tokens=8, repeats=2)
    assert list(t.method) == ["dynamic", "static", "generate"] and (t.status == "ok").all()
    assert (t.prefill_tok_s > 0).all() and (t.decode_tok_s > 0).all()
    assert (t.decode_min <= t.decode_tok_s).all() and (t.decode_tok_s <= t.decode_max).all()
    best = throughput_of(t, "small")
    assert best.decode == pytest.approx(t.decode_tok_s.max())
    with pytest.raises(ValueError, match="unknown methods"):
        measure_throughputs(model, Tok(), methods=("cuda-graphs",))
    with pytest.raises(ValueError, match="decode_tokens"):
        measure_throughputs(model, Tok(), decode_tokens=1)
    with pytest.raises(ValueError, match="no successful"):
        throughput_of(t, "big")
    with pytest.raises(ValueError, match="method must be"):
        greedy_decode(model, [1, 2], 3, "graphs")


def test_latency_table_by_hand():
    base = dict(small_probe_prefill_tokens=0, small_probe_decode_tokens=0, small_prefill_s=0.0, small_decode_s=0.0,
                small_probe_s=0.0, big_prefill_s=0.0, big_decode_s=0.0, small_prompt_tokens=100,
                big_prompt_tokens=80)
    recs = pd.DataFrame([
        dict(base, label="small only", method="small", wall_s=2.0, handoffs=0, small_prefill_tokens=100,
             small_decode_tokens=32, big_prefill_tokens=0, big_decode_tokens=0, small_kept_tokens=32,
             big_kept_tokens=0),
        dict(base, label="big only", method="big", wall_s=5.0, handoffs=0, small_prefill_tokens=0,
             small_decode_tokens=0, big_prefill_tokens=80, big_decode_tokens=32, small_kept_tokens=0,
             big_kept_tokens=32),
        dict(base, label="gap 50%", method="trigger", wall_s=4.0, handoffs=1, small_prefill_tokens=100,
             small_decode_tokens=32, big_prefill_tokens=100, big_decode_tokens=16, small_kept_tokens=16,
             big_kept_tokens=16),
    ])
    ctl = (Throughput(prefill=100.0, decode=10.0), Throughput(prefill=50.0, decode=4.0))
    best = (Throughput(prefill=200.0, decode=20.0), Throughput(prefill=100.0, decode=8.0))
    out = latency_table(recs, ctl, best, chunk_tokens=16).set_index("mode")
    assert out.loc["small only", "sequential_s"] == pytest.approx(100 / 100 + 32 / 10)
    assert out.loc["big only", "sequential_s"] == pytest.approx(80 / 50 + 32 / 4)
    assert out.loc["gap 50%", "sequential_s"] == pytest.approx(100 / 100 + 32 / 10 + 100 / 50 + 16 / 4)
    assert out.loc["small only", "pipelined_sim_s"] == pytest.approx(100 / 200 + 32 / 20)
    assert out.loc["big only", "pipelined_sim_s"] == pytest.approx(80 / 100 + 32 / 8)
    # pipelined, by hand: both prefill the 100-token prompt at once (the slower: 100 / 100 = 1 s); one big chunk of
    # 16 (big decode 16 / 8 = 2 s vs small prefill 16 / 200) and one small chunk (16 / 20 = 0.8 s vs 16 / 100)
    assert out.loc["gap 50%", "pipelined_sim_s"] == pytest.approx(1.0 + 2.0 + 0.8)
    assert out.loc["gap 50%", "measured_over_sequential"] == pytest.approx(4.0 / 10.2)
    assert out.loc["gap 50%", "handoffs_per_problem"] == 1
    with pytest.raises(ValueError, match="prompt token"):
        latency_table(recs.drop(columns="small_prompt_tokens"), ctl, best)
    assert math.isnan(latency_table(recs.assign(method="assisted"), ctl, best).pipelined_sim_s.iloc[0])
