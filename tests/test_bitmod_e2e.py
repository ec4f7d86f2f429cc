"""The end-to-end decode harness (effllm_lib/bitmod/e2e.py) against transformers' own forward pass: the static-cache
decode step must give the logits of the model's full forward at every position and the same greedy tokens, for
float, packed BitMoD and torch-int4 linears; the int4 baseline against its own dequantization by hand."""

import pytest
import torch

from effllm_lib.bitmod import e2e
from effllm_lib.bitmod.packed import BitMoDLinear
from effllm_lib.bitmod.quantize import BitMoDConfig, quantize_
from effllm_lib.models import tiny_causal_lm


def tiny(arch="llama", hidden=128):
    model, _ = tiny_causal_lm(arch, tokenizer="byte", layers=2, hidden=hidden)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_step_matches_full_forward(arch):
    model = tiny(arch)
    if arch == "qwen2":   # qwen2 has q/k/v biases: make them non-zero so they are exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    ids = [5, 17, 200, 3, 99, 41, 7, 250, 11, 64, 128, 2]
    ref = hf_logits(model, ids)
    dec = e2e.StaticDecoder(model, max_len=32)
    tok = torch.zeros(1, 1, dtype=torch.long)
    pos = torch.zeros(1, dtype=torch.long)
    for i, t in enumerate(ids):
        tok.fill_(t)
        pos.fill_(i)
        out = dec.step(tok, pos)
        assert torch.allclose(out[0], ref[i], atol=1e-4, rtol=1e-4), i


def greedy_by_hand(model, ids, steps):
    ids = list(ids)
    for _ in range(steps):
        ids.append(int(hf_logits(model, ids)[-1].argmax()))
    return ids[-steps:]


def test_decode_times_generates_the_greedy_tokens():
    model = tiny()
    prompt = [1, 2, 3, 4, 5]
    dec = e2e.StaticDecoder(model, max_len=16)
    times, fed = e2e.decode_times(dec, prompt, steps=8)
    want = greedy_by_hand(model, prompt, 8)
    assert fed == want and len(times) == 8 and all(t > 0 for t in times)
    # a second round on the same decoder starts again from the prompt's end
    assert e2e.decode_times(dec, prompt, steps=8)[1] == want


def test_packed_bitmod_model_decodes_like_its_own_forward():
    model = tiny().to(torch.bfloat16)
    quantize_(model, BitMoDConfig(bits=4, group_size=64, packed=True))
    assert isinstance(model.lm_head, BitMoDLinear) and isinstance(model.model.layers[0].mlp.down_proj, BitMoDLinear)
    ids = [9, 8, 7, 6, 5, 4]
    ref = hf_logits(model, ids)     # the multi-token kernel path of the same layers
    dec = e2e.StaticDecoder(model, max_len=16)
    _, _, logits = e2e.prefill(dec, ids)
    assert torch.allclose(logits[0], ref[-1], atol=0.05, rtol=0.05)
    bpt = e2e.bytes_per_token(dec, context=6)
    packed = sum(m.footprint()["bytes"] for m in model.modules() if isinstance(m, BitMoDLinear))
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * 16 * 2 * 6
    assert bpt == {"linears": packed, "embed_row": 2 * cfg.hidden_size, "kv_cache": kv,
                   "total": packed + 2 * cfg.hidden_size + kv}


def test_int4_linear_against_its_dequantization():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(256, 48, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05, generator=g)
    q, sz = e2e.int4_quantize(lin.weight, 64)
    deq = e2e.int4_dequantize(q, sz, 64)
    # asymmetric 4-bit rounding: every weight within half a step (+ the bf16 rounding of scale and zero)
    step = sz[..., 0].float().T.repeat_interleave(64, 1)
    assert ((deq - lin.weight).abs() <= 0.5 * step + 0.02 * lin.weight.abs().max()).all()
    assert ((q >= 0) & (q <= 15)).all()
    layer = e2e.Int4Linear.from_linear(lin)
    assert layer.group_size == 128 and layer.nbytes() == 48 * 256 // 2 + 2 * 2 * 48 * 2
    x = torch.randn(3, 256, generator=g).bfloat16()
    q, sz = e2e.int4_quantize(lin.weight, 128)
    ref = x.double() @ e2e.int4_dequantize(q, sz, 128).double().T
    y = layer(x).double()
    assert ((y - ref).abs() <= 2 ** -7 * (x.double().abs() @ e2e.int4_dequantize(q, sz, 128).double().abs().T)
            + 1e-3).all()


def test_int4_model_decodes_like_its_own_forward():
    model = tiny().to(torch.bfloat16)
    for name in e2e.decoder_linears(model)[:-1]:   # lm_head: 259 byte-level tokens, not a multiple of 16
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, e2e.Int4Linear.from_linear(model.get_submodule(name)))
    ids = [3, 1, 4, 1, 5, 9]
    ref = hf_logits(model, ids)
    _, _, logits = e2e.prefill(e2e.StaticDecoder(model, max_len=8), ids)
    assert torch.allclose(logits[0], ref[-1], atol=0.05, rtol=0.05)


def test_random_overrides_swap_only_the_decoder():
    model = tiny().to(torch.bfloat16)
    over = e2e.random_overrides(model, "bitmod", bits=3, group_size=64)
    assert set(over) == set(e2e.decoder_linears(model)) and len(over) == 2 * 7 + 1
    dec = e2e.StaticDecoder(model, max_len=8, overrides=over)
    assert dec.layers[1]["down_proj"] is over["model.layers.1.mlp.down_proj"]
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)   # the model itself is untouched
    assert torch.isfinite(e2e.prefill(dec, [1, 2])[2]).all()
    over4 = e2e.random_overrides(model, "int4", names=e2e.decoder_linears(model)[:-1])   # lm_head: 259 rows
    assert len(over4) == 14 and all(isinstance(m, e2e.Int4Linear) for m in over4.values())
    assert torch.isfinite(e2e.prefill(e2e.StaticDecoder(model, 8, overrides=over4), [1, 2])[2]).all()


def test_bad_inputs():
    model = tiny()
    with pytest.raises(ValueError, match="no projection"):
        e2e.StaticDecoder(model, 8, overrides={"model.layers.0.mlp.nope": torch.nn.Identity()})
    dec = e2e.StaticDecoder(model, 8)
    with pytest.raises(ValueError, match="exceed max_len"):
        e2e.decode_times(dec, [1, 2, 3], steps=6)
    with pytest.raises(ValueError, match="CUDA graphs"):
        e2e.decode_times(dec, [1], steps=2, graph=True)
    gemma, _ = tiny_causal_lm("gemma3", tokenizer="byte", layers=1, hidden=64)
    with pytest.raises(ValueError, match="runs"):
        e2e.StaticDecoder(gemma, 8)
    with pytest.raises(ValueError, match="kind"):
        e2e.random_overrides(model, "int8")
    with pytest.raises(ValueError, match="multiple"):
        e2e.int4_quantize(torch.randn(4, 100), 64)
    with pytest.raises(ValueError, match="divisible by 16"):
        e2e.Int4Linear.from_linear(torch.nn.Linear(64, 40))


@pytest.mark.parametrize("name,cls", [
    ("_bitmod_gemv_kernel", "bitmod_triton"), ("void at::native::tinygemm_m16n8k16_chunk_kernel", "int4_tinygemm"),
    ("aten::_weight_int4pack_mm_for_cpu", "int4_tinygemm"), ("pytorch_flash::flash_fwd_kernel", "attention"),
    ("fmha_cutlassF_bf16_aligned", "attention"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16>", "matmul"), ("aten::mm", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "other"),
    ("aten::rsqrt", "other"), ("aten::argmax", "other")])
def test_kernel_class_by_name(name, cls):
    assert e2e.kernel_class(name) == cls


def test_step_profile_counts_the_matmuls_of_a_step():
    # CPU: aten ops' self time. A 2-layer model runs 7 projections per layer plus lm_head per step; each shows
    # up as one matmul-class op at least (linear -> addmm/mm), and the classes' shares add up to one.
    model = tiny()
    dec = e2e.StaticDecoder(model, max_len=32)
    prof = e2e.step_profile(dec, [1, 2, 3, 4], steps=3)
    by = prof.set_index("kernel_class")
    assert by.loc["matmul", "kernels_per_step"] >= 2 * 7 + 1
    assert {"other", "attention", "outside_aten"} <= set(by.index)
    assert abs(prof.share.sum() - 1) < 1e-9 and (prof.us_per_step >= 0).all() and by.loc["matmul", "us_per_step"] > 0
    with pytest.raises(ValueError, match="steps"):
        e2e.step_profile(dec, [1, 2], steps=0)
