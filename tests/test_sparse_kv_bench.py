"""The KV benchmark and quality functions at toy sizes: bytes and bounds consistent with the format, the
nothing-pruned sparse cache indistinguishable from the dense one, bad arguments refused."""

import math
import random

import pandas as pd
import pytest

from effllm_lib.sparse.format import compression_ratio
from effllm_lib.sparse.kv_bench import (attention_latency, decode_latency_kv, dense_kv_bytes, kv_speedup_claim,
                                        median_interval)
from effllm_lib.sparse.quality import kv_pruning_quality

FAKE_BW = {"bytes_per_s": 1e9, "gbs": 1.0, "source": "given"}


def test_attention_latency_bytes_and_bounds():
    df = attention_latency([96], [0.0, 0.5], ["portable"], query_heads=4, kv_heads=2, head_dim=32, repeats=1,
                           min_layers=2, bandwidth=FAKE_BW, log=lambda m: None)
    assert set(df.impl) == {"sdpa", "eager", "dense_portable", "sparse_portable_s0", "sparse_portable_s0.5"}
    dense = df[df.impl == "sdpa"].iloc[0]
    assert dense.bytes == dense_kv_bytes(2, 96, 32) == 2 * 2 * 96 * 32 * 2
    # our kernel's dense layout reads exactly the dense bytes (96 is a multiple of 32: no tile padding)
    assert df[df.impl == "dense_portable"].bytes.iloc[0] == dense.bytes
    half = df[df.impl == "sparse_portable_s0.5"].iloc[0]
    # a random mask at 50 %: close to the format's ratio 2 / (2 (1 - s) + 1/8), less a little for the offsets
    assert half.byte_ratio == pytest.approx(compression_ratio(0.5), rel=0.1)
    assert (df.of_bound <= 1 + 1e-9).all() and (df.ms > 0).all()
    # the baseline is the fastest candidate that keeps every entry, our kernel's included
    keep_all = df[df.sparsity == 0]
    assert df.baseline.iloc[0] == keep_all.loc[keep_all.ms.idxmin(), "impl"]
    assert df[df.impl == df.baseline].speedup.iloc[0] == 1.0  # paired with itself
    assert (df.speedup_vs_sdpa == df.ms[df.impl == "sdpa"].iloc[0] / df.ms).all()
    assert ((df.speedup_lo <= df.speedup) & (df.speedup <= df.speedup_hi)).all()


def test_attention_latency_rejects_bad_sparsity():
    with pytest.raises(ValueError, match="sparsities"):
        attention_latency([32], [1.0], ["portable"], bandwidth=FAKE_BW, log=lambda m: None)
    with pytest.raises(ValueError, match="unknown KV kernel"):
        attention_latency([32], [0.5], ["amx"], bandwidth=FAKE_BW, log=lambda m: None)


def test_decode_latency_kv_small():
    df = decode_latency_kv("smollm2-135m", [64], 0.5, ["portable"], steps=1, warmup=0, rounds=3, layers=1,
                           log=lambda m: None)
    assert list(df.impl) == ["dense_kv", "dense_kv_prealloc", "dense_kv_ownkernel_portable", "sparse_kv_portable"]
    dense, sparse = df.iloc[:3], df.iloc[3]
    # 64 cached tokens are whole tiles: our kernel's dense layout holds exactly the dense cache's bytes
    assert sparse.kv_bytes < dense.kv_bytes.iloc[0] == dense.kv_bytes.iloc[1] == dense.kv_bytes.iloc[2]
    assert sparse.ceiling > 1.0 and (dense.ceiling == 1.0).all()
    assert (df.weight_bytes == df.weight_bytes.iloc[0]).all()
    base = dense.loc[dense.token_ms.idxmin()]
    assert (df.baseline == base.impl).all() and base.speedup == 1.0  # fastest dense is the base
    # the point is the median of the per-round ratios: always inside their interval (the scorecard needs that)
    assert ((df.speedup_lo <= df.speedup) & (df.speedup <= df.speedup_hi)).all()
    sdpa = dense[dense.impl != "dense_kv_ownkernel_portable"].token_ms.min()
    assert df.speedup_vs_sdpa.tolist() == pytest.approx((sdpa / df.token_ms).tolist())
    assert (df.rounds == 3).all()
    assert df.speedup_ci_level.tolist() == pytest.approx([0.75] * 4)  # 3 rounds: min/max, 1 - 2/8
    with pytest.raises(ValueError, match="rounds"):
        decode_latency_kv("smollm2-135m", [64], 0.5, ["portable"], rounds=1, layers=1, log=lambda m: None)


def test_median_interval_order_statistics():
    # coverage 1 - 2 P(Bin(n, 1/2) < k) by hand: n = 8 -> k = 2 gives 1 - 2 * 9/256 < 0.95, so min/max (0.992)
    lo, hi, level = median_interval([3, 1, 4, 1.5, 9, 2, 6, 5])
    assert (lo, hi) == (1, 9) and level == pytest.approx(1 - 2 / 256)
    # n = 10: k = 2 gives 1 - 2 * 11/1024 = 0.9785 >= 0.95, k = 3 gives 1 - 2 * 56/1024 < 0.95
    xs = list(range(10, 0, -1))
    assert median_interval(xs) == (2, 9, pytest.approx(1 - 22 / 1024))
    assert median_interval([7.0]) == (7.0, 7.0, 0.0)
    with pytest.raises(ValueError):
        median_interval([])
    # the coverage is real: over many samples from a skewed law the interval holds the true median that often
    rnd = random.Random(0)
    hits = 0
    for _ in range(2000):
        lo, hi, level = median_interval([rnd.expovariate(1.0) for _ in range(10)])
        hits += lo <= math.log(2) <= hi
    assert abs(hits / 2000 - level) < 0.015


def _frame(speedup, lo, hi, ceiling):
    return pd.DataFrame([{"model": "llama3-8b", "context": 16384, "impl": "sparse_kv_avx512", "kv_sparsity": 0.5,
                          "weights": "torch bf16", "threads": 16, "rounds": 10, "baseline": "dense_kv_ownkernel_avx512",
                          "speedup": speedup, "speedup_lo": lo, "speedup_hi": hi, "speedup_ci_level": 0.979,
                          "speedup_vs_sdpa": 1.2, "speedup_vs_dynamic_cache": 1.8, "ceiling": ceiling,
                          "of_ceiling": speedup / ceiling},
                         {"model": "llama3-8b", "context": 4096, "impl": "sparse_kv_avx512", "kv_sparsity": 0.5,
                          "weights": "torch bf16", "threads": 16, "rounds": 10, "baseline": "dense_kv_prealloc",
                          "speedup": 9.0, "speedup_lo": 8.0, "speedup_hi": 10.0, "speedup_ci_level": 0.979,
                          "speedup_vs_sdpa": 9.0, "speedup_vs_dynamic_cache": 9.0, "ceiling": 1.01,
                          "of_ceiling": 9.0}])


def test_kv_speedup_claim_gate():
    row, _ = kv_speedup_claim(_frame(1.04, 1.01, 1.07, 1.058))  # within its bytes: a claim row, longest context
    assert row["claim_id"] == "kv_sparsity_speedup"
    assert (row["ours"], row["ours_lo"], row["ours_hi"]) == (1.04, 1.01, 1.07)
    assert "16384" in row["reason"] and "dense_kv_ownkernel_avx512" in row["reason"]
    row, _ = kv_speedup_claim(_frame(1.10, 1.058, 1.12, 1.058))  # the lower end touches the ceiling: allowed
    assert row is not None
    row, why = kv_speedup_claim(_frame(1.14, 1.10, 1.18, 1.058))  # wholly above the ceiling: no row
    assert row is None and "beats its bytes" in why
    with pytest.raises(ValueError, match="sparse_kv"):
        kv_speedup_claim(_frame(1.0, 1.0, 1.0, 1.0).assign(impl="dense_kv"))


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
