"""The packed BitMoD format: exact round trip to quantize_'s fake-quantized weight, the byte layout on a
hand-made case, the footprint in bytes, BitMoDLinear / pack_ / load_packed_ on a small Llama model."""

import pytest
import torch
from torch import nn

from effllm_lib.bitmod import datatypes as dt
from effllm_lib.bitmod.packed import (BitMoDLinear, PackedBitMoD, code_values, dequantize, load_packed_, pack_,
                                      pack_weight, unpack_codes)
from effllm_lib.bitmod.quantize import BitMoDConfig, quantize_, quantize_tensor


def heavy_weights(rows, cols, dtype, seed=0):
    """Student-t rows with per-row scale spread: uses all four types and large/small scales."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(rows, cols, generator=g) / torch.randn(3, rows, cols, generator=g).pow(2).mean(0).sqrt()
    return (t * 0.02 * torch.logspace(-2, 1, rows).unsqueeze(1)).to(dtype)


@pytest.mark.parametrize("bits", [3, 4])
def test_code_table_is_the_bitmod_value_sets(bits):
    table = code_values(bits)
    for t, grid in enumerate(dt.bitmod_grids(bits)):
        assert sorted(table[t].tolist()) == list(grid.values)  # every code a distinct value of the type
    sign = 1 << (bits - 1)
    assert (table[:, 0] == 0).all()                                       # code 0 is zero (padding)
    assert table[:, sign].tolist() == [v for v in ((10, -10, 16, -16) if bits == 4 else (3, -3, 6, -6))]
    assert torch.equal(table[:, 1:sign], -table[:, sign + 1:])           # sign-magnitude elsewhere


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits,group_size,cols", [(4, 128, 576), (3, 128, 576), (4, 64, 200), (3, 30, 97),
                                                  (4, 2, 9)])
def test_round_trip_is_bit_exact(dtype, bits, group_size, cols):
    w = heavy_weights(48, cols, dtype)
    ref = quantize_tensor(w, bits, "bitmod", group_size)
    p = pack_weight(ref.weight, bits, group_size)
    if dtype != torch.bfloat16:
        assert p.scales.dtype == torch.float32
    out = dequantize(p)
    assert out.dtype == dtype and torch.equal(out.view(torch.uint8), ref.weight.view(torch.uint8))  # bit for bit
    # with the quantizer's own type ids the same weight comes back; every type present is used
    p2 = pack_weight(ref.weight, bits, group_size, type_ids=ref.type_ids)
    assert torch.equal(dequantize(p2), ref.weight)
    _, types = unpack_codes(p2)
    assert torch.equal(types, ref.type_ids.long())


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 4])
def test_round_trip_llama3_8b_shape(bits):
    w = (torch.randn(14336, 4096, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    ref = quantize_tensor(w, bits, "bitmod", 128).weight
    p = pack_weight(ref, bits, 128)
    assert torch.equal(dequantize(p), ref)
    assert p.bits_per_weight() == bits + (16 + 2) / 128


def test_hand_made_layout():
    # one row, one group of 8 at 4 bits: codes 0..7 then 8..15 -> byte j = code j | code j+4 << 4
    w4 = torch.tensor([[0, 1, 2, 3, 4, 6, 8, 12]], dtype=torch.float32) * 0.25   # ER+, scale 0.25
    p = pack_weight(w4, 4, 8)
    assert p.codes.tolist() == [[0x40, 0x51, 0x62, 0x73]]
    assert p.scales.tolist() == [[0.25]] and p.type_ids.tolist() == [[0]]
    # EA- (type 3) special value -16 -> code 8; -1 -> code 9 (sign bit + magnitude 1)
    w = torch.tensor([[-16, -1, 0, 0, 0, 0, 0, 0]], dtype=torch.float32)
    p = pack_weight(w, 4, 8)
    assert p.type_ids.tolist() == [[3]] and p.codes.tolist() == [[0x08, 0x09, 0, 0]]
    # 3 bits, group 8: values (FP3 ER-, scale 1) -> codes; 2-bit plane byte j = c[j]&3 | c[j+2]&3 << 2 | ...
    w3 = torch.tensor([[1, 2, 4, -1, -2, -4, -3, 0]], dtype=torch.float32)
    p = pack_weight(w3, 3, 8)
    codes = [1, 2, 3, 5, 6, 7, 4, 0]
    plane2 = [(codes[j] & 3) | (codes[j + 2] & 3) << 2 | (codes[j + 4] & 3) << 4 | (codes[j + 6] & 3) << 6
              for j in range(2)]
    plane1 = sum(((c >> 2) & 1) << i for i, c in enumerate(codes))
    assert p.type_ids.tolist() == [[1]] and p.codes.tolist() == [plane2 + [plane1]]


def test_bf16_weights_get_fp16_scales_unless_too_small():
    w = (torch.randn(64, 256, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    assert pack_weight(quantize_tensor(w, 4, "bitmod", 128).weight, 4, 128).scales.dtype == torch.float16
    tiny = quantize_tensor(w * 1e-4, 4, "bitmod", 128).weight           # scales ~2e-7: FP16 subnormal
    p = pack_weight(tiny, 4, 128)
    assert p.scales.dtype == torch.float32 and torch.equal(dequantize(p), tiny)


def test_footprint_counts_real_bytes():
    ref = quantize_tensor(heavy_weights(4, 256, torch.bfloat16), 4, "bitmod", 128).weight
    layer = BitMoDLinear.from_packed(pack_weight(ref, 4, 128))
    f = layer.footprint()
    assert f["bytes"] == 4 * 2 * 64 + 4 * 2 * 2 + 4 * 1       # codes + fp16 scales + one type byte per row
    assert f["bits_per_weight"] == pytest.approx(8 * 532 / 1024)


def test_not_bitmod_weights_raise():
    w = heavy_weights(8, 128, torch.bfloat16)
    with pytest.raises(ValueError, match="not reproduced"):
        pack_weight(w, 4, 128)                                  # a float weight
    int4 = quantize_tensor(w, 4, "int", 128).weight
    with pytest.raises(ValueError, match="not reproduced"):
        pack_weight(int4, 4, 128)                               # INT4 has +-5, +-7: not a BitMoD value
    ref = quantize_tensor(w.float(), 4, "bitmod", 128).weight
    with pytest.raises(ValueError, match="scale_dtype='fp32'"):
        pack_weight(ref, 4, 128, scale_dtype="fp16")
    with pytest.raises(ValueError, match="bits"):
        pack_weight(ref, 5, 128)
    with pytest.raises(ValueError, match="scale_dtype"):
        pack_weight(ref, 4, 128, scale_dtype="e4m3")
    with pytest.raises(ValueError, match="NaN"):
        pack_weight(torch.full((2, 8), float("nan")), 4, 8)


def tiny_llama(hidden=192):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=320, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval().to(torch.bfloat16)


@pytest.mark.parametrize("dtype", ["bitmod", "fp_ea_neg"])
def test_pack_model_runs_saves_and_reloads(dtype, tmp_path):
    model = tiny_llama()   # 192 = 128 + a tail of 64; 320 = 2.5 groups
    report = quantize_(model, BitMoDConfig(bits=4, group_size=128, dtype=dtype))
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        ref_logits = model(ids).logits
        fq = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    foot = pack_(model, report, kernel="reference")
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    for name, w in fq.items():
        assert torch.equal(model.get_submodule(name).dequantize(), w)
    expect = 0
    for name, w in fq.items():   # the padded tail group costs full codes: 192 -> 2 groups, 320 -> 3
        n_groups = -(-w.shape[1] // 128)
        expect += w.shape[0] * (n_groups * (64 + model.get_submodule(name).scales.element_size()) + 1)
    assert foot["bytes"] == expect and foot["bits_per_weight"] == 8 * expect / sum(w.numel() for w in fq.values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)       # same weights, same F.linear: same logits
    path = tmp_path / "packed.pt"
    torch.save(model.state_dict(), path)
    fresh = tiny_llama()
    fresh.lm_head.weight = nn.Parameter(fresh.lm_head.weight.detach().clone())   # quantize_ untied it
    load_packed_(fresh, torch.load(path), kernel="reference")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref_logits)
    assert isinstance(fresh.lm_head, BitMoDLinear) and fresh.lm_head.bits == 4


def test_pack_rejects_other_methods():
    model = tiny_llama()
    report = quantize_(model, BitMoDConfig(bits=4, group_size=128, dtype="int"))
    with pytest.raises(ValueError, match="BitMoD-grid"):
        pack_(model, report)


def test_packed_is_a_plain_dataclass():
    p = pack_weight(torch.zeros(2, 16), 3, 8)
    assert isinstance(p, PackedBitMoD) and p.nbytes() == 2 * 6 + 2 * 2 * 4 + 2
    assert torch.equal(dequantize(p), torch.zeros(2, 16))


@pytest.mark.slow
def test_real_model_packs_exactly_and_runs():
    """SmolLM2-135M (real weights, bf16): every quantized layer packs bit-exactly, the packed model's logits
    equal the fake-quantized model's with the reference path, and the CPU kernels stay within bf16 noise of them."""
    from effllm_lib.bitmod import cpu_gemv
    from effllm_lib.models import load_causal_lm

    model, tok = load_causal_lm("smollm2-135m")
    model = model.to(torch.bfloat16).eval()
    ids = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy is")])
    report = quantize_(model, BitMoDConfig(bits=4, group_size=128))
    with torch.no_grad():
        ref = model(ids).logits
    foot = pack_(model, report, kernel="reference")          # raises if any group is not reproduced exactly
    assert foot["layers"] == len(report.layers) and foot["bits_per_weight"] < 4.7   # 576 = 4.5 groups: padded
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
        if cpu_gemv.extension_available():
            for m in model.modules():
                if isinstance(m, BitMoDLinear):
                    m.kernel = "cpu"
            out = model(ids).logits.float()
            # fp32 accumulation vs bf16 matmuls, compounded over 30 layers: bf16-level noise, not a new model
            assert float((out - ref.float()).abs().max()) <= 0.05 * float(ref.float().abs().max())
            assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_quantize_with_packed_true_packs_the_model():
    """quantize_(model, BitMoDConfig(packed=True)) gives the same logits as fake quantization, from packed layers."""
    ref, model = tiny_llama(), tiny_llama()
    quantize_(ref, BitMoDConfig(bits=3, group_size=128))
    quantize_(model, BitMoDConfig(bits=3, group_size=128, packed=True))
    ids = torch.tensor([[2, 4, 8, 16]])
    assert isinstance(model.lm_head, BitMoDLinear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(ids).logits.float(), ref(ids).logits.float(), atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="BitMoD-grid"):
        BitMoDConfig(dtype="int", packed=True)
