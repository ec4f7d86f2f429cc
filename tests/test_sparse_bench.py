"""Benchmark helpers: the decoder-layer aggregation on a hand-made table, the meters on tiny inputs."""

import os

import pandas as pd
import pytest
import torch

from effllm_lib.sparse.bench import (decoder_layer_summary, interleaved_medians, layer_latency,
                                     measure_read_bandwidth, thread_scaling)


def test_decoder_layer_summary_weights_layers_by_count():
    rows = []
    for layer, count, t_torch, t_sparse in [("a", 2, 10.0, 5.0), ("b", 1, 30.0, 10.0)]:
        rows.append({"layer": layer, "count_per_decoder_layer": count, "sparsity": 0.5, "impl": "torch_bf16",
                     "latency_us": t_torch, "bound_us": 4.0})
        rows.append({"layer": layer, "count_per_decoder_layer": count, "sparsity": 0.5, "impl": "sparse_x",
                     "latency_us": t_sparse, "bound_us": 2.0})
    s = decoder_layer_summary(pd.DataFrame(rows)).set_index("impl")
    assert s.loc["torch_bf16", "total_us"] == 50.0  # 2 * 10 + 30
    assert s.loc["sparse_x", "total_us"] == 20.0  # 2 * 5 + 10
    assert s.loc["sparse_x", "speedup_vs_torch"] == pytest.approx(2.5)
    assert s.loc["sparse_x", "bound_fraction"] == pytest.approx(6.0 / 20.0)


def test_interleaved_medians_and_errors():
    calls = []
    med = interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3,
                              warmup=0)
    assert set(med) == {"a", "b"} and calls == ["a", "b", "b", "a", "a", "b"]  # rotating order
    with pytest.raises(ValueError, match="repeats"):
        interleaved_medians({"a": lambda: None}, 0)


def test_layer_latency_smoke():
    df = layer_latency({"tiny": (32, 64, 1)}, [0.5], ["portable"], repeats=2, stream_bytes=1 << 16,
                       bandwidth=1e10)
    assert set(df.impl) == {"torch_bf16", "sparse_portable"}
    assert (df.latency_us > 0).all() and (df.bound_us > 0).all()
    assert df[df.impl == "torch_bf16"].speedup_vs_torch.iloc[0] == 1.0


def test_bandwidth_probe_uses_all_threads_and_a_buffer_beyond_the_cache():
    probe = measure_read_bandwidth(64 * 2**20, repeats=2)
    assert probe["threads"] == torch.get_num_threads()
    assert probe["buffer_mib"] == 64 and str(probe["threads"]) in probe["method"]
    # physically plausible for DRAM: above 0.5 GB/s, below 2 TB/s; the best of the methods it ran
    assert 0.5 < probe["gbs"] < 2000
    assert probe["gbs"] == pytest.approx(max(probe["rates_gbs"].values()), rel=0.01)
    assert {"read_portable", "torch_bf16_gemv"} <= set(probe["rates_gbs"]) and probe["source"] in probe["rates_gbs"]
    assert measure_read_bandwidth(repeats=1)["buffer_mib"] >= 4 * probe["llc_mib"]
    with pytest.raises(ValueError, match="repeats"):
        measure_read_bandwidth(1 << 20, repeats=0)


def test_bound_is_bytes_over_the_given_bandwidth_or_the_fastest_read_seen():
    df = layer_latency({"tiny": (32, 64, 1)}, [0.5], ["portable"], repeats=2, stream_bytes=1 << 16,
                       bandwidth=1e15)
    assert (df.bound_us - df.weight_bytes / 1e15 * 1e6).abs().max() < 1e-9 and (df.bound_source == "probe").all()
    # a probe slower than some implementation: the bound rises to that implementation's rate, none exceeds it
    df = layer_latency({"tiny": (32, 64, 1)}, [0.5], ["portable"], repeats=2, stream_bytes=1 << 16,
                       bandwidth=1.0)
    rates = df.weight_bytes / (df.latency_us * 1e-6)
    assert df.bound_bandwidth_gbs.iloc[0] * 1e9 == pytest.approx(rates.max())
    assert df.bound_fraction.max() == pytest.approx(1.0) and (df.bound_fraction <= 1 + 1e-12).all()
    assert df.bound_source.iloc[0].startswith(df.loc[rates.idxmax(), "impl"])


def test_thread_scaling_restores_threads_and_caps_at_cores():
    before = torch.get_num_threads()
    df = thread_scaling({"tiny": (32, 64, 1)}, 0.5, ["portable"], [1, 10**4], repeats=1, stream_bytes=1 << 16,
                        bandwidth_bytes=1 << 22)
    assert torch.get_num_threads() == before
    assert set(df.threads) == {1, os.cpu_count() or 1}


def test_limits_breakdown_by_hand():
    from effllm_lib.sparse.bench import limits_breakdown

    lat = pd.DataFrame([
        {"layer": "L", "out_features": 64, "in_features": 128, "sparsity": 0.5, "impl": "torch_bf16",
         "latency_us": 8.0, "bound_us": 4.0, "weight_bytes": 16384, "threads": 4},
        {"layer": "L", "out_features": 64, "in_features": 128, "sparsity": 0.5, "impl": "sparse_avx512",
         "latency_us": 2.0, "bound_us": 1.0, "weight_bytes": 9000, "threads": 4}])
    limits = pd.DataFrame([{"kernel": "avx512", "sparsity": 0.5, "layer": "L", "ns_per_tile_row_1thread": 5.0}])
    r = limits_breakdown(lat, limits).iloc[0]
    # 64 * 128 / 32 = 256 tile rows x 5 ns = 1.28 us on one thread, 0.32 us on 4
    assert r.decode_1thread_us == pytest.approx(1.28) and r.decode_all_threads_us == pytest.approx(0.32)
    assert r.speedup_vs_torch == 4.0 and r.decode_share == pytest.approx(0.64)
    assert r.torch_read_gbs == pytest.approx(16384 / 8.0 / 1e3)
    # a file from before the -fopenmp fix (no threads column, no bandwidth_method) ran on one thread
    old = lat.drop(columns="threads")
    old.attrs["provenance"] = {"params": {"threads": 16}}
    assert limits_breakdown(old, limits).iloc[0].threads == 1
