"""The decode harness: model shapes against the packaged models' parameter counts, the byte ceiling by hand,
and a 2-layer run end to end."""

import pandas as pd
import pytest
import torch

from effllm_lib.models import MODELS
from effllm_lib.sparse import SparsifyConfig, sparsify_
from effllm_lib.sparse.decode_bench import (MODEL_CONFIGS, bytes_per_token, decode_latency, linear_blocks,
                                            model_config, random_model)


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-1.5b"])
def test_configs_have_the_packaged_models_parameter_counts(name):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(name))
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert params == MODELS[name].params


def test_llama3_8b_shape():
    c = model_config("llama3-8b")
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(c)
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248  # Meta-Llama-3-8B


def test_random_model_mask_and_ceiling_by_hand(one_thread):
    dense = random_model("gemma3-270m", 0.5, layers=1)
    q = dense.model.layers[0].self_attn.q_proj.weight
    assert abs((q == 0).float().mean().item() - 0.5) < 0.01 and (dense.lm_head.weight != 0).float().mean() > 0.99
    sparse = sparsify_(random_model("gemma3-270m", 0.5, layers=1), SparsifyConfig(method="none"))
    bd, bs = bytes_per_token(dense, 100), bytes_per_token(sparse, 100)
    # one layer: q 1024x640, k and v 256x640, o 640x1024, gate/up/down 2048x640 -> 5,570,560 weights
    assert bd["linear_bytes"] == 2 * 5_570_560
    assert bd["lm_head_bytes"] == bs["lm_head_bytes"] == 2 * 262144 * 640  # lm_head stays dense
    assert bd["kv_bytes"] == 2 * 1 * 1 * 256 * 2 * 100
    # compressed: 1 bit per weight + 2 bytes per nonzero (+ 8 bytes per strip, + small padding)
    expect = 5_570_560 / 8 + 2 * 0.5 * 5_570_560
    assert abs(bs["linear_bytes"] - expect) / expect < 0.01
    assert len(linear_blocks(dense)) == 7 and len(linear_blocks(sparse)) == 3  # qkv, o, mlp


def test_two_layer_run(one_thread):
    df = decode_latency(["smollm2-135m"], 0.5, ["auto"], prompt=8, steps=2, warmup=1, rounds=2, layers=2,
                        log=lambda m: None)
    assert set(df.impl) == {"torch_bf16", "sparse_auto"}
    assert (df.token_ms > 0).all() and (df.token_p10_ms <= df.token_ms).all()
    assert (df.token_ms <= df.token_p90_ms).all()
    d = df.set_index("impl")
    assert d.loc["torch_bf16", "speedup_vs_torch"] == 1.0 and d.loc["sparse_auto", "ceiling"] > 1.0
    assert d.loc["sparse_auto", "of_ceiling"] == pytest.approx(d.loc["sparse_auto", "speedup_vs_torch"] /
                                                              d.loc["sparse_auto", "ceiling"])
    with pytest.raises(ValueError, match="unknown model"):
        model_config("gpt-5")


def _decode_row(impl, ms, gbs, sparsity=0.5):
    return {"model": "llama3-8b", "impl": impl, "mask_sparsity": sparsity, "threads": 16, "token_ms": ms,
            "token_p10_ms": ms - 1, "token_p90_ms": ms + 1, "ceiling": 1.68, "read_gbs": gbs}


def test_e2e_claims_by_hand():
    from effllm_lib.sparse.decode_bench import e2e_claims

    df = pd.DataFrame([_decode_row("torch_bf16", 300.0, 50.0), _decode_row("dense_amx", 100.0, 90.0),
                       _decode_row("sparse_avx512", 150.0, 60.0),
                       _decode_row("sparse_amx", 120.0, 75.0), _decode_row("sparse_amx", 1.0, 1.0, 0.7)])
    rows = e2e_claims(df).set_index("claim_id").ours
    assert rows["e2e_speedup_vs_pytorch"] == pytest.approx(300 / 120)  # fastest sparse kernel, 50% rows only
    assert rows["avx_vs_amx_batch1_e2e"] == pytest.approx(120 / 150)


def test_e2e_claims_needs_the_torch_baseline():
    from effllm_lib.sparse.decode_bench import e2e_claims

    with pytest.raises(ValueError, match="torch_bf16"):
        e2e_claims(pd.DataFrame([_decode_row("sparse_amx", 120.0, 75.0)]))


@pytest.mark.skipif("amx" not in __import__("effllm_lib.sparse", fromlist=["x"]).available_kernels("bf16"),
                    reason="needs an AMX CPU")
def test_dense_amx_linear_matches_f_linear(one_thread):
    from effllm_lib.sparse.decode_bench import DenseAMXLinear, dense_amx_model

    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 70, bias=True).bfloat16()  # odd sizes: padding of K and of the output strips
    x = torch.randn(3, 5, 100).bfloat16()
    ref = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    got = DenseAMXLinear(lin)(x).float()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=0.05, rtol=0.02)
    m = dense_amx_model(random_model("smollm2-135m", 0.5, layers=2))
    assert sum(isinstance(mod, DenseAMXLinear) for mod in m.modules()) == 2 * 7


def test_decode_summary_by_hand():
    import pandas as pd

    from effllm_lib.sparse.decode_bench import decode_summary

    df = pd.DataFrame({"model": ["m"] * 4, "impl": ["torch_bf16", "dense_amx", "sparse_avx512", "sparse_amx"],
                       "token_ms": [40.0, 30.0, 25.0, 20.0], "framework_ms": [10.0, 9.0, 9.0, 9.0],
                       "ceiling": [1.6] * 4})
    r = decode_summary(df).iloc[0]
    assert (r.best_sparse, r.best_dense) == ("sparse_amx", "dense_amx")
    assert r.vs_torch == 2.0 and r.vs_best_dense == 1.5 and r.framework_share == 0.25
    assert r.of_ceiling_vs_best_dense == pytest.approx(1.5 / 1.6)
    with pytest.raises(ValueError, match="sparse"):
        decode_summary(df[df.impl == "torch_bf16"])
