"""The torch.library ops (every kernel this CPU runs) against float64 references, the thread split, the
bandwidth meters, the C++-timed loop, the measured kernel="auto" and torch.compile through the fake kernels."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from effllm_lib.sparse import SparseLinear, available_kernels, cpu_features, pack_bf16, unpack_bf16
from effllm_lib.sparse._build import load_extension
from effllm_lib.sparse.ops import ACT_CODES, KERNEL_CODES, sparse_ops
from effllm_lib.sparse.sparsify import interleave_gate_up
from test_sparse_kernels import check_close, random_problem

KERNELS = available_kernels("bf16")
CORES = os.cpu_count() or 1


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,k,m", [(16, 32, 1), (17, 33, 3), (100, 70, 9), (64, 256, 17), (48, 64, 40)])
def test_spmm_op_matches_f_linear(kernel, n, k, m):
    w, x, b = random_problem(n, k, m, 0.6, seed=n + k + m)
    p = pack_bf16(w)
    y = sparse_ops().spmm_bf16(x.reshape(1, m, k), p.bitmaps, p.values, p.strip_offsets, n, b.float(),
                               KERNEL_CODES[kernel])
    assert y.shape == (1, m, n) and y.dtype == torch.bfloat16
    check_close(y[0], x, w, b)
    # float32 input is taken too (cast inside)
    y32 = sparse_ops().spmm_bf16(x.float(), p.bitmaps, p.values, p.strip_offsets, n, None, KERNEL_CODES[kernel])
    check_close(y32, x, w, None)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("act", list(ACT_CODES))
@pytest.mark.parametrize("m", [1, 5, 33])
def test_act_mul_op_matches_gate_up_reference(kernel, act, m):
    inter, k = 48, 96
    g, x, _ = random_problem(inter, k, m, 0.5, seed=m)
    u, _, _ = random_problem(inter, k, m, 0.5, seed=m + 100)
    p = pack_bf16(interleave_gate_up(g, u))
    y = sparse_ops().spmm_bf16_act_mul(x, p.bitmaps, p.values, p.strip_offsets, inter, KERNEL_CODES[kernel],
                                       ACT_CODES[act])
    # contract: gate and up come out of the product as bf16 (as torch's bf16 layers would give them), act and
    # mul run in float, one rounding at the end; a different accumulation order may move g or u by one bf16 ulp
    gd = (x.double() @ g.double().T).bfloat16().double()
    ud = (x.double() @ u.double().T).bfloat16().double()
    a = gd * torch.sigmoid(gd) if act == "silu" else 0.5 * gd * (1 + torch.tanh(
        (2 / torch.pi) ** 0.5 * (gd + 0.044715 * gd ** 3)))
    ref = a * ud
    ulp = 2**-7
    tol = 1.2 * ud.abs() * gd.abs() * ulp + a.abs() * ud.abs() * ulp + 2**-8 * ref.abs() + 1e-6
    assert y.shape == (m, inter) and not torch.isnan(y).any()
    assert ((y.double() - ref).abs() <= tol).all(), ((y.double() - ref).abs() - tol).max().item()


def test_interleave_gate_up_order():
    g = torch.arange(32 * 2).reshape(32, 2).float()
    u = -g
    w = interleave_gate_up(g, u)
    assert torch.equal(w[:16], g[:16]) and torch.equal(w[16:32], u[:16]) and torch.equal(w[32:48], g[16:])
    with pytest.raises(ValueError, match="multiple of 16"):
        interleave_gate_up(torch.zeros(8, 4), torch.zeros(8, 4))


@pytest.mark.parametrize("n,k", [(16, 32), (40, 70), (33, 64), (5, 31)])
def test_densify_matches_unpack(n, k):
    w, _, _ = random_problem(n, k, 1, 0.5, seed=n * k)
    p = pack_bf16(w)
    d = sparse_ops().densify_bf16(p.bitmaps, p.values, p.strip_offsets, n, k)
    assert torch.equal(d, w) and torch.equal(d, unpack_bf16(p))


def test_ops_refuse_bad_arguments():
    p = pack_bf16(torch.randn(16, 32))
    ops = sparse_ops()
    with pytest.raises(RuntimeError, match="in_features"):
        ops.spmm_bf16(torch.randn(1, 64), p.bitmaps, p.values, p.strip_offsets, 16, None, 0)
    with pytest.raises(RuntimeError, match="does not match"):
        ops.spmm_bf16(torch.randn(1, 32), p.bitmaps, p.values, p.strip_offsets, 40, None, 0)
    with pytest.raises(RuntimeError, match="kernel code"):
        ops.spmm_bf16(torch.randn(1, 32), p.bitmaps, p.values, p.strip_offsets, 16, None, 7)
    with pytest.raises(RuntimeError, match="bias"):
        ops.spmm_bf16(torch.randn(1, 32), p.bitmaps, p.values, p.strip_offsets, 16, torch.zeros(3), 0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        ops.spmm_bf16_act_mul(torch.randn(1, 32), p.bitmaps, p.values, p.strip_offsets, 8, 0, 0)
    if "amx" not in KERNELS:
        with pytest.raises(RuntimeError, match="amx cannot run"):
            ops.spmm_bf16(torch.randn(1, 32), p.bitmaps, p.values, p.strip_offsets, 16, None, 2)


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
@pytest.mark.parametrize("kernel", KERNELS)
def test_byte_balanced_split_gives_the_same_answer(kernel):
    # one dense half and one very sparse half: the split by bytes puts the cut far from the middle strip
    w, x, _ = random_problem(160, 64, 3, 0.0, seed=5)
    w[80:] = 0
    w[80:, 0] = 1
    p = pack_bf16(w)
    run = lambda: sparse_ops().spmm_bf16(x, p.bitmaps, p.values, p.strip_offsets, 160, None, KERNEL_CODES[kernel])
    y1, y2 = with_threads(1, run), with_threads(2, run)
    check_close(y2, x, w, None)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("method", ["portable"] + (["avx512"] if cpu_features().kernel_avx512 else []))
def test_stream_read_sees_every_word(method):
    buf = torch.zeros(1 << 16, dtype=torch.int64)
    for pos in (0, 7, 8191, (1 << 16) - 1):  # the tail words and each quarter's start
        buf.zero_()
        buf[pos] = 1 << (pos % 60)
        err, acc, _ = load_extension().stream_read(buf, method)
        assert err == "" and acc == 1 << (pos % 60), (method, pos)
    assert "method" in load_extension().stream_read(buf, "sse")[0]


@pytest.mark.parametrize("kernel", KERNELS)
def test_timed_loop_runs_the_kernel(kernel):
    p = pack_bf16(torch.randn(64, 256))
    x = torch.randn(1, 256).bfloat16()
    err, sec = load_extension().spmm_bf16_timed(x, p.bitmaps, p.values, p.strip_offsets, 64, KERNEL_CODES[kernel],
                                                5, True)
    assert err == "" and 0 < sec < 1
    err, _ = load_extension().spmm_bf16_timed(x, p.bitmaps, p.values[:3], p.strip_offsets, 64, 0, 5, True)
    assert "values" in err


def test_auto_is_the_measured_fastest_and_cached(monkeypatch, tmp_path):
    from effllm_lib.sparse import autotune

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "_table", {})
    monkeypatch.setattr(autotune, "TOKEN_CLASSES", (1, 16))
    monkeypatch.setattr(autotune, "CAL_SHAPE", (64, 256))
    rec = autotune.calibrate()
    for c, secs in rec["seconds"].items():
        assert rec["choice"][c] == min(secs, key=secs.get)
        assert set(secs) <= set(KERNELS) | {"dense"} and ("dense" in secs) == (int(c) >= 16)
    files = list(tmp_path.rglob("auto_threads*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == rec
    # a cached answer is used as it is (here: edited to dense for the 16-token class)
    rec["choice"]["16"] = "dense"
    files[0].write_text(json.dumps(rec))
    assert autotune.auto_kernel(40) == "dense" and autotune.auto_kernel(1) == rec["choice"]["1"]
    assert autotune.token_class(3) == 1 and autotune.token_class(16) == 16 and autotune.token_class(999) == 16


def test_dense_path_and_sparse_path_agree():
    w, x, b = random_problem(48, 64, 20, 0.5, seed=9)
    lin = torch.nn.Linear(64, 48)
    lin.weight.data, lin.bias.data = w.float(), b
    layer = SparseLinear.from_linear(lin, kernel="portable")
    check_close(layer.dense_forward(x), x, w, b.bfloat16().float())
    check_close(layer(x), x, w, b)


def test_torch_compile_traces_through_the_ops_without_graph_breaks():
    torch._dynamo.reset()
    w, x, b = random_problem(32, 64, 1, 0.5, seed=3)
    lin = torch.nn.Linear(64, 32)
    lin.weight.data, lin.bias.data = w.float(), b
    layer = SparseLinear.from_linear(lin, kernel="portable")
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), SparseLinear.from_linear(torch.nn.Linear(32, 16), "portable"))
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), model(x))


@pytest.mark.parametrize("n,k", [(1, 1), (16, 32), (17, 33), (100, 70), (48, 300)])
def test_fast_pack_equals_the_reference_pack(n, k):
    from effllm_lib.sparse import pack_bf16_fast

    w, _, _ = random_problem(n, k, 1, 0.5, seed=n + k)
    w[0, 0] = -0.0  # a negative zero is a pruned weight in both
    ref, fast = pack_bf16(w), pack_bf16_fast(w)
    assert torch.equal(ref.bitmaps, fast.bitmaps) and torch.equal(ref.strip_offsets, fast.strip_offsets)
    assert torch.equal(ref.values, fast.values) and (fast.out_features, fast.in_features) == (n, k)
    with pytest.raises(ValueError, match="2-D"):
        pack_bf16_fast(torch.zeros(3))
