"""Sparse KV-cache attention: pruning, the packed format, the op against a float64 reference on the same pruned
caches, the transformers integration against transformers' own SDPA decode on the pruned caches, bad input."""

import pytest
import torch

from effllm_lib.sparse.kv_cache import (SparseKVCache, SparseKVConfig, SparseKVLayer, available_kv_kernels,
                                        enable_sparse_kv_, pack_kv, prune_kv, resolve_kv_kernel,
                                        sparse_kv_attention)

KERNELS = list(available_kv_kernels())


def reference_prune(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the round(s * n) smallest |t|, ties in index order, by a stable sort (not kthvalue)."""
    flat = t.reshape(-1).clone()
    drop = int(round(sparsity * flat.numel()))
    order = torch.sort(flat.abs().float(), stable=True).indices
    flat[order[:drop]] = 0
    return flat.view(t.shape)


def reference_attention(q, k, v, k_tail, v_tail, scale):
    """float64 softmax(scale q K^T) V per query head over [K; K_tail], [V; V_tail] (GQA: head i -> i // g)."""
    g = q.shape[0] // k.shape[0]
    keys = torch.cat([k.double(), k_tail.double()], 1)
    vals = torch.cat([v.double(), v_tail.double()], 1)
    return torch.stack([torch.softmax(scale * (q[i].double() @ keys[i // g].T), -1) @ vals[i // g]
                        for i in range(q.shape[0])])


def test_prune_kv_matches_sort_reference_with_ties():
    torch.manual_seed(0)
    t = torch.randint(-4, 5, (3, 40, 16)).float()  # many ties at every magnitude
    for s in (0.0, 0.3, 0.5, 0.9):
        got = prune_kv(t, s)
        assert torch.equal(got, reference_prune(t, s))
        assert int((got == 0).sum() - (t == 0).sum()) <= round(s * t.numel())
    t2 = t.clone()  # the input is left as it was
    prune_kv(t, 0.5)
    assert torch.equal(t, t2)


def test_pack_kv_round_trip_exact():
    torch.manual_seed(1)
    k, v = prune_kv(torch.randn(2, 37, 64), 0.6), prune_kv(torch.randn(2, 37, 64), 0.4)
    p = pack_kv(k, v)
    assert torch.equal(p.keys(), k.bfloat16()) and torch.equal(p.values(), v.bfloat16())
    ks, vs = p.sparsity
    assert ks == pytest.approx(0.6, abs=1e-3) and vs == pytest.approx(0.4, abs=1e-3)
    # bytes: 1 bit per (padded) element + 2 per nonzero + offsets, for K and V^T
    n = 2 * 37 * 64
    assert p.nbytes() < 2 * n * 2 * 0.75


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("hq,hkv,s,d,t,sparsity", [
    (9, 3, 100, 64, 0, 0.5),     # SmolLM2's heads, no tail
    (4, 1, 37, 256, 5, 0.9),     # Gemma 3's heads; S not a multiple of 16 or 32
    (12, 2, 300, 128, 17, 0.0),  # Qwen2.5's heads, nothing pruned
    (8, 8, 1, 16, 3, 0.5),       # MHA, one pruned position, head_dim padded to 32 inside
    (32, 8, 520, 128, 1, 0.7),   # Llama-3-8B's heads
])
def test_sparse_kv_attention_matches_float64_reference(kernel, hq, hkv, s, d, t, sparsity):
    torch.manual_seed(hq * 1000 + s)
    k, v = prune_kv(torch.randn(hkv, s, d), sparsity), prune_kv(torch.randn(hkv, s, d), sparsity)
    q, k_tail, v_tail = torch.randn(hq, d), torch.randn(hkv, t, d), torch.randn(hkv, t, d)
    scale = 0.7 / d ** 0.5
    out = sparse_kv_attention(q, pack_kv(k, v), k_tail, v_tail, scale, kernel)
    assert out.dtype == torch.float32 and out.shape == (hq, d)
    # the kernel sees K/V rounded to bf16 (the cache format); float32 rounding is the only other difference
    ref = reference_attention(q, k.bfloat16(), v.bfloat16(), k_tail, v_tail, scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_tails_and_no_tail(kernel):
    torch.manual_seed(3)
    k, v = prune_kv(torch.randn(2, 50, 32), 0.5), prune_kv(torch.randn(2, 50, 32), 0.5)
    q = torch.randn(4, 32, dtype=torch.bfloat16)
    kt, vt = torch.randn(2, 4, 32, dtype=torch.bfloat16), torch.randn(2, 4, 32, dtype=torch.bfloat16)
    p = pack_kv(k, v)
    torch.testing.assert_close(sparse_kv_attention(q, p, kt, vt, kernel=kernel).double(),
                               reference_attention(q.float(), k.bfloat16(), v.bfloat16(), kt, vt, 32 ** -0.5),
                               rtol=1e-5, atol=2e-6)
    empty = torch.zeros(2, 0, 32)
    torch.testing.assert_close(sparse_kv_attention(q, p, kernel=kernel).double(),
                               reference_attention(q.float(), k.bfloat16(), v.bfloat16(), empty, empty, 32 ** -0.5),
                               rtol=1e-5, atol=2e-6)


def test_hand_computed_case():
    # one head, two positions, D = 16: q . k = [0, 2 * 1 * 1] -> softmax([0, 2]) with scale 1
    k = torch.zeros(1, 2, 16)
    k[0, 1, 3] = 2.0
    v = torch.zeros(1, 2, 16)
    v[0, 0, 0], v[0, 1, 0] = 1.0, 3.0
    q = torch.zeros(1, 16)
    q[0, 3] = 1.0
    e = torch.exp(torch.tensor(2.0, dtype=torch.float64))
    expected = (1.0 + 3.0 * e) / (1.0 + e)
    for kernel in KERNELS:
        out = sparse_kv_attention(q, pack_kv(k, v), scale=1.0, kernel=kernel)
        assert float(out[0, 0]) == pytest.approx(float(expected), rel=1e-6)
        assert float(out[0, 1:].abs().max()) == 0.0


# ------------------------------------------------------------------------------------------- bad input
def test_config_rejects_bad_sparsity_and_kernel():
    for bad in (1.0, -0.1, 1.5, True, "0.5", None):
        with pytest.raises(ValueError, match="sparsity"):
            SparseKVConfig(sparsity=bad)
    with pytest.raises(ValueError, match="value_sparsity"):
        SparseKVConfig(value_sparsity=1.0)
    with pytest.raises(ValueError, match="unknown KV kernel"):
        SparseKVConfig(kernel="amx")
    with pytest.raises(ValueError, match="sparsity"):
        prune_kv(torch.randn(2, 3), 1.0)


def test_missing_kernel_is_a_clear_error():
    missing = [k for k in ("avx2", "avx512") if k not in KERNELS]
    for k in missing:
        with pytest.raises(RuntimeError, match="cannot run on this CPU"):
            resolve_kv_kernel(k)
    with pytest.raises(ValueError, match="unknown KV kernel"):
        resolve_kv_kernel("fast")


def test_shape_errors():
    p = pack_kv(torch.randn(2, 10, 32), torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="head_dim"):
        pack_kv(torch.randn(2, 10, 24), torch.randn(2, 10, 24))
    with pytest.raises(ValueError, match="same shape"):
        pack_kv(torch.randn(2, 10, 32), torch.randn(2, 11, 32))
    with pytest.raises(ValueError, match="empty"):
        pack_kv(torch.randn(2, 0, 32), torch.randn(2, 0, 32))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        sparse_kv_attention(torch.randn(3, 32), p)
    with pytest.raises(ValueError, match=r"q must be \[query_heads, 32\]"):
        sparse_kv_attention(torch.randn(4, 16), p)
    with pytest.raises(ValueError, match="k_tail"):
        sparse_kv_attention(torch.randn(4, 32), p, torch.randn(3, 1, 32), torch.randn(3, 1, 32))
    with pytest.raises(ValueError, match="both"):
        sparse_kv_attention(torch.randn(4, 32), p, torch.randn(2, 1, 32), None)
    with pytest.raises(TypeError, match="floating point"):
        sparse_kv_attention(torch.ones(4, 32, dtype=torch.long), p)


def test_op_refuses_truncated_values():
    p = pack_kv(torch.randn(2, 10, 32), torch.randn(2, 10, 32))
    p.k_values = p.k_values[:5]
    with pytest.raises(RuntimeError, match="values"):
        sparse_kv_attention(torch.randn(4, 32), p)


# ----------------------------------------------------------------------------------- transformers
def _tiny(arch, layers=2):
    from effllm_lib.models import tiny_causal_lm

    model, _ = tiny_causal_lm(arch, tokenizer="byte", layers=layers, hidden=64)
    return enable_sparse_kv_(model)


@pytest.mark.parametrize("arch,layers", [("llama", 2), ("qwen2", 2), ("gemma3", 6)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8])
def test_decode_matches_sdpa_on_the_pruned_cache(arch, layers, sparsity):
    """Each decode step's logits equal transformers' SDPA decode whose cache holds the same pruned bf16 K/V."""
    from transformers import DynamicCache

    model = _tiny(arch, layers)
    torch.manual_seed(5)
    prompt, cont = torch.randint(0, 250, (1, 70)), torch.randint(0, 250, (1, 5))
    with torch.no_grad():
        cache = SparseKVCache(model.config, SparseKVConfig(sparsity))
        ref = DynamicCache(config=model.config)
        a = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
        b = model(input_ids=prompt, past_key_values=ref, use_cache=True).logits
        assert torch.equal(a, b)  # the prompt attends densely either way
        n_sparse = 0
        for i, layer in enumerate(ref.layers):
            if isinstance(cache.layers[i], SparseKVLayer):
                n_sparse += 1
                layer.keys = reference_prune(layer.keys, sparsity).bfloat16().float()
                layer.values = reference_prune(layer.values, sparsity).bfloat16().float()
        assert n_sparse == (1 if arch == "gemma3" else layers)  # Gemma 3: 5 sliding layers stay dense
        for t in range(cont.shape[1]):
            a = model(input_ids=cont[:, t:t + 1], past_key_values=cache, use_cache=True).logits
            b = model(input_ids=cont[:, t:t + 1], past_key_values=ref, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            assert cache.get_seq_length() == ref.get_seq_length() == 71 + t
        # several tokens after the prompt: attended densely over the pruned cache, still the same
        a = model(input_ids=cont[:, :3], past_key_values=cache, use_cache=True).logits
        b = model(input_ids=cont[:, :3], past_key_values=ref, use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pruning_changes_the_output():
    """The sparse path really reads the pruned cache: 80 % pruning moves the logits, 0 % does not."""
    from transformers import DynamicCache

    model = _tiny("llama")
    prompt, nxt = torch.randint(0, 250, (1, 64)), torch.randint(0, 250, (1, 1))
    outs = {}
    with torch.no_grad():
        for s in (None, 0.0, 0.8):
            cache = DynamicCache(config=model.config) if s is None else SparseKVCache(model.config, SparseKVConfig(s))
            model(input_ids=prompt, past_key_values=cache, use_cache=True)
            outs[s] = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    assert (outs[0.0] - outs[None]).abs().max() < 1e-2  # bf16 rounding of the cache only
    assert (outs[0.8] - outs[None]).abs().max() > 10 * (outs[0.0] - outs[None]).abs().max()


def test_generate_works_unchanged():
    model = _tiny("llama")
    prompt = torch.randint(0, 250, (1, 40))
    out = model.generate(prompt, past_key_values=SparseKVCache(model.config, SparseKVConfig(0.5)), max_new_tokens=6,
                         do_sample=False)
    # the same greedy tokens by hand with a fresh sparse cache
    cache = SparseKVCache(model.config, SparseKVConfig(0.5))
    ids = prompt
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        for _ in range(6):
            nxt = logits[:, -1:].argmax(-1)
            ids = torch.cat([ids, nxt], 1)
            logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
    assert torch.equal(out, ids)


def test_cache_errors():
    from effllm_lib.models import tiny_causal_lm

    plain, _ = tiny_causal_lm("llama", tokenizer="byte", layers=2, hidden=64)
    with pytest.raises(ValueError, match="enable_sparse_kv_"):
        SparseKVCache(plain.config)
    model = _tiny("llama")
    with pytest.raises(TypeError, match="SparseKVConfig"):
        SparseKVCache(model.config, 0.5)
    with pytest.raises(ValueError, match="batch 1"):
        with torch.no_grad():
            model(input_ids=torch.randint(0, 250, (2, 8)), past_key_values=SparseKVCache(model.config),
                  use_cache=True)
    gemma2 = _tiny("gemma3", layers=2)  # both layers sliding-window: nothing to prune
    with pytest.raises(ValueError, match="no full-attention layer"):
        SparseKVCache(gemma2.config)


# ------------------------------------------------------------------- the fair dense baseline of the benchmark
def test_dense_gqa_decode_matches_repeated_heads():
    """Grouped-query decode without repeat_kv equals the textbook form: repeat each KV head, softmax(qK^T)V."""
    from effllm_lib.sparse.kv_cache import dense_gqa_decode

    torch.manual_seed(3)
    q, k, v = torch.randn(1, 8, 1, 16, dtype=torch.float64), torch.randn(1, 2, 37, 16, dtype=torch.float64), \
        torch.randn(1, 2, 37, 16, dtype=torch.float64)
    kr, vr = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
    ref = torch.softmax((q @ kr.transpose(-1, -2)) * 0.25, -1) @ vr  # (1, 8, 1, 16)
    out = dense_gqa_decode(q, k, v, 0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2))


@pytest.mark.parametrize("arch,layers", [("llama", 2), ("gemma3", 6)])
def test_preallocated_cache_matches_dynamic_cache(arch, layers):
    """Prefill, decode steps past the first reserve (a regrow) and a multi-token chunk: the same logits as the
    stock DynamicCache with SDPA."""
    from transformers import DynamicCache

    from effllm_lib.sparse.kv_cache import PreallocatedKVCache

    model = _tiny(arch, layers)
    torch.manual_seed(6)
    prompt, cont = torch.randint(0, 250, (1, 30)), torch.randint(0, 250, (1, 12))
    with torch.no_grad():
        pre, ref = PreallocatedKVCache(model.config, reserve=4), DynamicCache(config=model.config)
        torch.testing.assert_close(model(input_ids=prompt, past_key_values=pre, use_cache=True).logits,
                                   model(input_ids=prompt, past_key_values=ref, use_cache=True).logits)
        for t in range(8):  # 30 + 4 reserved: the buffer grows at step 5
            torch.testing.assert_close(model(input_ids=cont[:, t:t + 1], past_key_values=pre, use_cache=True).logits,
                                       model(input_ids=cont[:, t:t + 1], past_key_values=ref, use_cache=True).logits,
                                       rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(input_ids=cont[:, 8:], past_key_values=pre, use_cache=True).logits,
                                   model(input_ids=cont[:, 8:], past_key_values=ref, use_cache=True).logits,
                                   rtol=1e-4, atol=1e-5)
        assert pre.get_seq_length() == ref.get_seq_length() == 42
