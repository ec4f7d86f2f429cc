"""sparsify_ on tiny random Llama / Qwen2 / Gemma3 models: the packed weights against independently pruned
ones (full sort), the model's logits against the dense model carrying those pruned weights, save/reload
through state_dict, and bad input that leaves the model untouched."""

import copy
import io

import pytest
import torch
from torch import nn

from effllm_lib.models import tiny_causal_lm
from effllm_lib.sparse import (FusedSparseLinear, LinearSlice, SparseGatedMLP, SparseLinear, SparsifyConfig,
                               cpu_features, load_sparse_state_dict_, sparsify_, unpack_bf16)

ARCHS = ["llama", "qwen2", "gemma3"]
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def tiny(arch, seed=0):
    model, tok = tiny_causal_lm(arch, seed=seed, tokenizer="byte", hidden=64)
    return model, tok


def lowest_by_sort(score, drop):
    """Mask of the `drop` lowest entries of each row, by a stable full sort."""
    order = torch.sort(score, dim=1, stable=True).indices[:, :drop]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)


def packed_weights(model):
    """{layer i: {proj: dense weight}} read back from the sparse modules (fused ones split again)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        a, m = layer.self_attn, layer.mlp
        assert isinstance(a.q_proj, FusedSparseLinear) and isinstance(a.k_proj, LinearSlice)
        qkv = unpack_bf16(a.q_proj.weight)
        nq, nk, nv = a.q_proj.splits
        assert isinstance(m, SparseGatedMLP)
        gu = unpack_bf16(m.gate_up.weight)
        inter = gu.shape[0] // 2
        gu = gu.reshape(inter // 16, 2, 16, -1)
        out[i] = {"q_proj": qkv[:nq], "k_proj": qkv[nq:nq + nk], "v_proj": qkv[nq + nk:],
                  "o_proj": unpack_bf16(a.o_proj.weight), "gate_proj": gu[:, 0].reshape(inter, -1),
                  "up_proj": gu[:, 1].reshape(inter, -1), "down_proj": unpack_bf16(m.down_proj.weight)}
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_magnitude_packs_exactly_the_sorted_choice_and_matches_the_pruned_dense_model(arch):
    model, _ = tiny(arch)
    dense = copy.deepcopy(model)
    sparsify_(model, SparsifyConfig(sparsity=0.5, method="magnitude_row", kernel="portable"))
    got = packed_weights(model)
    for i, layer in enumerate(dense.model.layers):
        for p in PROJ:
            lin = getattr(layer.self_attn if p in PROJ[:4] else layer.mlp, p)
            w = lin.weight.detach()  # pruned at the model's own precision, then stored as bf16
            mask = lowest_by_sort(w.abs(), w.shape[1] // 2)
            assert torch.equal(got[i][p], w.masked_fill(mask, 0).bfloat16()), (i, p)
            lin.weight.data = w.masked_fill(mask, 0).bfloat16().float()
    assert isinstance(model.lm_head, nn.Linear)  # stays dense
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        ref, out = dense(ids).logits, model(ids).logits
    # the sparse model runs its linears in bf16: close to the fp32 model with the same pruned weights
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    g = model.generate(ids, max_new_tokens=4, do_sample=False)  # the HF generation loop runs unchanged
    assert g.shape == (1, 28) and g[0, 24] == out[0, -1].argmax()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_wanda_prunes_by_weight_times_activation_norm(arch):
    model, tok = tiny(arch)
    dense = copy.deepcopy(model)
    calib = [torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    # independent activation norms: capture every input, then one norm per channel
    inputs = {}
    hooks = [mod.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
             for n, mod in dense.named_modules() if n.split(".")[-1] in PROJ]
    with torch.no_grad():
        for ids in calib:
            dense(input_ids=ids)
    for h in hooks:
        h.remove()
    sparsify_(model, SparsifyConfig(sparsity=0.5, method="wanda", kernel="portable"), calibration=calib)
    got = packed_weights(model)
    for i, layer in enumerate(dense.model.layers):
        for p in PROJ:
            name = f"model.layers.{i}.{'self_attn' if p in PROJ[:4] else 'mlp'}.{p}"
            w = dense.get_submodule(name).weight.detach()
            norm = torch.linalg.vector_norm(torch.cat(inputs[name]).double(), dim=0)
            mask = lowest_by_sort(w.abs().double() * norm[None], w.shape[1] // 2)
            assert torch.equal(got[i][p], w.masked_fill(mask, 0).bfloat16()), (i, p)


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_save_and_reload(arch):
    model, _ = tiny(arch)
    cfg = SparsifyConfig(sparsity=0.7, method="magnitude", kernel="portable")
    sparsify_(model, cfg)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh, _ = tiny(arch, seed=1)  # other random weights: everything must come from the file
    load_sparse_state_dict_(fresh, torch.load(buf), cfg)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, fresh(ids).logits)
    assert any(k.endswith("mlp.gate_up.values") for k in model.state_dict())
    # a corrupt file is refused when loaded, with the reason
    bad = {k: (v[:3] if k.endswith("o_proj.values") else v) for k, v in model.state_dict().items()}
    other, _ = tiny(arch, seed=2)
    with pytest.raises(RuntimeError, match="values has"):
        load_sparse_state_dict_(other, bad, cfg)


def test_unsupported_architecture_is_refused_untouched():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        sparsify_(model, SparsifyConfig())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_layer_it_cannot_convert_is_named_and_nothing_is_half_converted():
    model, _ = tiny("llama")
    model.model.layers[1].mlp.down_proj = nn.Identity()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj is a Identity"):
        sparsify_(model, SparsifyConfig(kernel="portable"))
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)  # layer 0 was not swapped either
    sparsify_(model := tiny("llama")[0], SparsifyConfig(kernel="portable"))
    with pytest.raises(ValueError, match="not an nn.Linear"):  # twice: already sparse
        sparsify_(model, SparsifyConfig(kernel="portable"))


def test_bad_config():
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="sparsity"):
            SparsifyConfig(sparsity=bad)
    with pytest.raises(ValueError, match="method"):
        SparsifyConfig(method="sparsegpt")
    with pytest.raises(TypeError, match="SparsifyConfig"):
        sparsify_(nn.Linear(4, 4), {"sparsity": 0.5})
    model, _ = tiny("qwen2")
    with pytest.raises(ValueError, match="needs calibration"):
        sparsify_(model, SparsifyConfig(method="wanda"))
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)


@pytest.mark.skipif(cpu_features().kernel_amx_bf16, reason="this CPU and OS allow AMX")
def test_amx_where_the_os_denies_it_fails_before_any_change():
    model, _ = tiny("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="cannot run on this CPU"):
        sparsify_(model, SparsifyConfig(kernel="amx"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def test_plain_modules_get_every_linear_but_lm_head():
    model = nn.Sequential()
    model.add_module("up", nn.Linear(48, 80))
    model.add_module("lm_head", nn.Linear(80, 30))
    sparsify_(model, SparsifyConfig(sparsity=0.5, kernel="portable"))
    assert isinstance(model.up, SparseLinear) and isinstance(model.lm_head, nn.Linear)
    assert model.up.weight.sparsity == pytest.approx(0.5, abs=1e-3)


def test_prune_weights_matches_sparsify_zero_pattern():
    """prune_weights_ zeroes exactly the weights sparsify_ drops (the packed weights' zeros), nothing packed."""
    from effllm_lib.models import tiny_causal_lm
    from effllm_lib.sparse import SparsifyConfig, sparsify_
    from effllm_lib.sparse.sparsify import prune_weights_

    model, _ = tiny_causal_lm("llama", tokenizer="byte", hidden=64)
    masked, _ = tiny_causal_lm("llama", tokenizer="byte", hidden=64)
    cfg = SparsifyConfig(sparsity=0.5, method="magnitude")
    prune_weights_(masked, cfg)
    w = masked.model.layers[0].mlp.down_proj.weight
    assert isinstance(masked.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert int((w == 0).sum()) == round(0.5 * w.numel())
    sparsify_(model, cfg)
    packed = model.model.layers[0].mlp.down_proj.weight.to_dense()
    assert torch.equal(packed != 0, w != 0)
    assert torch.equal(packed, w[:, :].bfloat16())
