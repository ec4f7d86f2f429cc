"""The KV benchmark and quality functions at toy sizes: bytes and bounds consistent with the format, the
nothing-pruned sparse cache indistinguishable from the dense one, bad arguments refused."""

import pytest

from effllm_lib.sparse.format import compression_ratio
from effllm_lib.sparse.kv_bench import attention_latency, decode_latency_kv, dense_kv_bytes
from effllm_lib.sparse.quality import kv_pruning_quality

FAKE_BW = {"bytes_per_s": 1e9, "gbs": 1.0, "source": "given"}


def test_attention_latency_bytes_and_bounds():
    df = attention_latency([96], [0.0, 0.5], ["portable"], query_heads=4, kv_heads=2, head_dim=32, repeats=1,
                           min_layers=2, bandwidth=FAKE_BW, log=lambda m: None)
    assert set(df.impl) == {"sdpa", "eager", "sparse_portable_s0", "sparse_portable_s0.5"}
    dense = df[df.impl == "sdpa"].iloc[0]
    assert dense.bytes == dense_kv_bytes(2, 96, 32) == 2 * 2 * 96 * 32 * 2
    half = df[df.impl == "sparse_portable_s0.5"].iloc[0]
    # a random mask at 50 %: close to the format's ratio 2 / (2 (1 - s) + 1/8), less a little for the offsets
    assert half.byte_ratio == pytest.approx(compression_ratio(0.5), rel=0.1)
    assert (df.of_bound <= 1 + 1e-9).all() and (df.ms > 0).all()
    assert (df[df.impl.isin(["sdpa", "eager"])].speedup <= 1 + 1e-9).all()


def test_attention_latency_rejects_bad_sparsity():
    with pytest.raises(ValueError, match="sparsities"):
        attention_latency([32], [1.0], ["portable"], bandwidth=FAKE_BW, log=lambda m: None)
    with pytest.raises(ValueError, match="unknown KV kernel"):
        attention_latency([32], [0.5], ["amx"], bandwidth=FAKE_BW, log=lambda m: None)


def test_decode_latency_kv_small():
    df = decode_latency_kv("smollm2-135m", [64], 0.5, ["portable"], steps=1, warmup=0, rounds=1, layers=1,
                           log=lambda m: None)
    assert list(df.impl) == ["dense_kv", "dense_kv_prealloc", "sparse_kv_portable"]
    sparse = df.iloc[2]
    assert sparse.kv_bytes < df.iloc[0].kv_bytes == df.iloc[1].kv_bytes and sparse.ceiling > 1.0
    assert sparse.weight_bytes == df.iloc[0].weight_bytes
    assert max(df.iloc[:2].speedup) == pytest.approx(1.0)  # the faster dense cache is the base


def test_kv_pruning_quality_zero_sparsity_is_dense():
    s, pw = kv_pruning_quality("tiny-llama", (0.0, 0.9), context=100, continuation=5, windows=2, scale="ci",
                               progress=False)
    assert list(s.config) == ["dense", "0", "0.9"]
    zero = s[s.config == "0"].iloc[0]
    assert zero.agree_pct == 100.0 and zero.kl_per_token < 1e-4  # bf16 rounding of the cache only
    assert zero.perplexity == pytest.approx(float(s.perplexity.iloc[0]), rel=1e-3)
    assert (s.tokens == 2 * 4).all() and len(pw) == 2 * 3
    assert s[s.config == "0.9"].kl_per_token.iloc[0] > zero.kl_per_token
    with pytest.raises(ValueError, match="continuation"):
        kv_pruning_quality("tiny-llama", (0.5,), context=10, continuation=1, windows=1, scale="ci")
