"""The sparse kernels against F.linear on the same pruned weight, on every kernel this CPU can run.

Every run writes into an output poisoned with NaN that is a column slice of a wider NaN buffer: an element
the kernel forgot stays NaN, and a write past out_features (the padding of the last strip) shows up in the
spare columns.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from effllm_lib.sparse import (SparseLinear, SparsityConfig, available_kernels, cpu_features, pack_bf16,
                               pack_int8, prune_magnitude, resolve_kernel, sparse_linear, sparsify_)

KERNELS = available_kernels("bf16")
INT8_KERNELS = available_kernels("int8")
CORES = os.cpu_count() or 1


def random_problem(n, k, m, sparsity, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[torch.rand(n, k, generator=g) < sparsity] = 0
    x = torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g) if bias else None
    return w.bfloat16(), x, b


def poisoned_out(m, n, spare=5):
    big = torch.full((m, n + spare), float("nan"), dtype=torch.bfloat16)
    return big, big[:, :n]


def check_close(y, x, w, b):
    """bf16 output vs a float64 reference of the same bf16 numbers: output rounding + fp32 accumulation."""
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    scale = F.linear(x.double().abs(), w.double().abs())  # sum |x w|: bounds accumulation error
    err = (y.double() - ref).abs()
    tol = 2**-8 * ref.abs() + 1e-5 * scale + 1e-6
    assert not torch.isnan(y).any(), "kernel left output elements unwritten (NaN poison survived)"
    assert (err <= tol).all(), f"max error {err.max().item():.3g} (worst excess {(err - tol).max().item():.3g})"


def run(kernel, w, x, b, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big, out = poisoned_out(x.shape[0], w.shape[0])
        y = sparse_linear(x, pack_bf16(w), b, kernel=kernel, out=out)
    finally:
        torch.set_num_threads(before)
    assert y.data_ptr() == out.data_ptr()
    assert torch.isnan(big[:, w.shape[0]:]).all(), "kernel wrote past out_features"
    return y


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (16, 32, 1), (17, 33, 3), (100, 70, 9), (64, 256, 64),
                                   (300, 130, 17)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95])
def test_matches_f_linear(kernel, n, k, m, sparsity):
    w, x, b = random_problem(n, k, m, sparsity, seed=n * 1000 + k + m)
    check_close(run(kernel, w, x, b, CORES), x, w, b)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threads", sorted({1, 2, CORES}))
def test_every_thread_count_gives_the_same_answer(kernel, threads):
    w, x, b = random_problem(16 * 9 + 5, 96, 5, 0.6, seed=threads)
    y = run(kernel, w, x, b, threads)
    check_close(y, x, w, b)
    assert torch.equal(y, run(kernel, w, x, b, 1))  # same arithmetic order per strip whatever the split


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 90), k=st.integers(1, 200), m=st.integers(1, 64), sparsity=st.floats(0, 0.95),
       threads=st.integers(1, CORES), kernel=st.sampled_from(KERNELS), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz(n, k, m, sparsity, threads, kernel, bias, seed):
    w, x, b = random_problem(n, k, m, sparsity, seed, bias)
    check_close(run(kernel, w, x, b, threads), x, w, b)


def test_a_wrong_weight_fails_the_check():
    # the tolerance is tight enough to catch a kernel that drops one nonzero
    w, x, b = random_problem(32, 64, 4, 0.5, seed=1)
    y = F.linear(x.float(), w.float(), b).bfloat16()
    w_bad = w.clone()
    i = (w_bad != 0).nonzero()[0]
    w_bad[i[0], i[1]] = 0
    y_bad = F.linear(x.float(), w_bad.float(), b).bfloat16()
    check_close(y, x, w, b)
    with pytest.raises(AssertionError):
        check_close(y_bad, x, w, b)


@pytest.mark.parametrize("kernel", INT8_KERNELS)
@pytest.mark.parametrize("n,k,m", [(5, 7, 1), (40, 130, 3), (33, 64, 20)])
def test_int8_matches_integer_reference(kernel, n, k, m):
    w, x, b = random_problem(n, k, m, 0.5, seed=k)
    wf, xf = w.float(), x.float()
    # independent quantization: symmetric, max-abs per weight row and per token, round half to even
    sw = wf.abs().amax(1) / 127
    qw = torch.round(wf / sw[:, None]).clamp(-127, 127)
    sx = xf.abs().amax(1) / 127
    qx = torch.round(xf / sx[:, None]).clamp(-127, 127)
    ref = (qx.double() @ qw.double().T) * sx.double()[:, None] * sw.double()[None, :] + b.double()
    big, out = poisoned_out(m, n)
    y = sparse_linear(x, pack_int8(w), b, kernel=kernel, out=out)
    assert torch.isnan(big[:, n:]).all() and not torch.isnan(y).any()
    assert ((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-4).all()
    # and it approximates the float layer to int8 precision
    assert (y.float() - F.linear(xf, wf, b)).abs().max() < 0.05 * F.linear(xf.abs(), wf.abs()).max()


def test_sparse_linear_module_and_sparsify():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("up", nn.Linear(48, 80))
    model.add_module("act", nn.ReLU())
    model.add_module("down", nn.Linear(80, 40, bias=False))
    model.add_module("lm_head", nn.Linear(40, 30))
    model = model.bfloat16()
    x = torch.randn(3, 7, 48).bfloat16()
    pruned = {n: prune_magnitude(m.weight, 0.5) for n, m in model.named_children() if n in ("up", "down")}
    expected_hidden = F.relu(F.linear(x.float(), pruned["up"].float(), model.up.bias.float())).bfloat16()
    sparsify_(model, SparsityConfig(sparsity=0.5, method="magnitude"))
    assert isinstance(model.up, SparseLinear) and isinstance(model.down, SparseLinear)
    assert isinstance(model.lm_head, nn.Linear)  # stays dense, as in the paper
    assert model.up.weight.sparsity == pytest.approx(0.5, abs=1 / (48 * 80))
    assert torch.equal(model.up.weight.to_dense(), pruned["up"].bfloat16())
    hidden = model.act(model.up(x))
    assert hidden.shape == (3, 7, 80) and hidden.dtype == torch.bfloat16
    check_close(model.up(x).reshape(-1, 80), x.reshape(-1, 48), pruned["up"], model.up.bias)
    assert (hidden.float() - expected_hidden.float()).abs().max() < 0.1
    assert model(x).shape == (3, 7, 30)


def test_from_linear_keeps_dtype_and_prunes_nothing():
    lin = nn.Linear(40, 24)
    layer = SparseLinear.from_linear(lin)
    x = torch.randn(2, 40)
    y = layer(x)
    assert y.dtype == torch.float32
    check_close(layer(x.bfloat16()), x.bfloat16(), lin.weight.bfloat16(), lin.bias)


def test_dispatch_never_offers_what_the_cpu_lacks():
    f = cpu_features()
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    # the kernel's own cpuid reading agrees with the OS's list (an independent reading)
    assert f.avx512_bf16 == ("avx512_bf16" in flags)
    assert f.avx512_vbmi2 == ("avx512_vbmi2" in flags)
    assert f.amx_tile == ("amx_tile" in flags)
    assert ("avx512" in KERNELS) == all(x in flags for x in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                                                             "avx512_vbmi2"))
    assert "portable" in KERNELS
    from effllm_lib.sparse.autotune import calibrate

    auto = resolve_kernel("auto", "bf16", tokens=1)  # the measured fastest sparse kernel here (autotune)
    secs = calibrate()["seconds"]["1"]
    assert auto in KERNELS and auto == min((k for k in secs if k != "dense"), key=secs.get)


@pytest.mark.skipif(cpu_features().kernel_amx_bf16, reason="this CPU has AMX")
def test_amx_where_there_is_none_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cannot run on this CPU"):
        resolve_kernel("amx")
    with pytest.raises(RuntimeError, match="cannot run on this CPU"):
        SparseLinear.from_linear(nn.Linear(8, 8), kernel="amx")
    w, x, _ = random_problem(16, 32, 1, 0.5, 0)
    from effllm_lib.sparse._build import load_extension

    p = pack_bf16(w)
    out = torch.full((1, 16), float("nan"), dtype=torch.bfloat16)
    # the C++ side refuses too, whatever Python says, and returns the reason instead of throwing
    err = load_extension().spmm_bf16(x, p.bitmaps, p.values, p.strip_offsets, 16, None, out, "amx")
    assert "kernel 'amx' needs AMX" in err and torch.isnan(out).all()


def test_bad_input_raises():
    p = pack_bf16(torch.randn(16, 32))
    with pytest.raises(ValueError, match="in_features"):
        sparse_linear(torch.randn(2, 31), p)
    with pytest.raises(ValueError, match="unknown bf16 kernel"):
        sparse_linear(torch.randn(2, 32), p, kernel="cuda")
    with pytest.raises(ValueError, match="out must be"):
        sparse_linear(torch.randn(2, 32), p, out=torch.empty(2, 16))
    with pytest.raises(ValueError, match="bias"):
        sparse_linear(torch.randn(2, 32), p, bias=torch.zeros(3))
    with pytest.raises(TypeError):
        sparse_linear(torch.zeros(2, 32, dtype=torch.int32), p)
    with pytest.raises(ValueError, match="sparsity"):
        SparsityConfig(sparsity=1.0)
    with pytest.raises(ValueError, match="method"):
        SparsityConfig(method="wanda2")
    p.values = p.values[:3]  # truncated values: the C++ check refuses instead of reading past the buffer
    with pytest.raises(RuntimeError, match="values"):
        sparse_linear(torch.randn(1, 32), p, kernel="portable")


def test_the_extension_refuses_a_corrupt_weight_without_throwing():
    """Every argument error comes back from C++ as a message (no C++ exception crosses into Python, which
    crashed the process on the device machine) and the output is left untouched."""
    from effllm_lib.sparse._build import load_extension

    ext = load_extension()
    p = pack_bf16(prune_magnitude(torch.randn(40, 64), 0.5))
    x = torch.randn(1, 64).bfloat16()
    out = torch.full((1, 40), float("nan"), dtype=torch.bfloat16)
    good = (x, p.bitmaps, p.values, p.strip_offsets, 40, None, out, "portable")
    bad_offsets = p.strip_offsets.clone()
    bad_offsets[1] = p.strip_offsets[2] + 1  # not monotonic
    cases = {
        "values has": dict(values=p.values[:3]),
        "strip_offsets has": dict(offsets=p.strip_offsets[:2]),
        "non-decreasing": dict(offsets=bad_offsets),
        "strip_offsets must be": dict(offsets=p.strip_offsets.int()),
        "bitmaps must be": dict(bitmaps=p.bitmaps.long()),
        "out must have": dict(out=torch.empty(1, 39, dtype=torch.bfloat16)),
        "x needs": dict(x=x[:, :32]),
        "unknown kernel": dict(kernel="tpu"),
        "does not match": dict(n=200),
    }
    for want, change in cases.items():
        args = list(good)
        for key, pos in (("x", 0), ("bitmaps", 1), ("values", 2), ("offsets", 3), ("n", 4), ("out", 6),
                         ("kernel", 7)):
            if key in change:
                args[pos] = change[key]
        assert want in ext.spmm_bf16(*args), want
    assert torch.isnan(out).all()
    assert ext.spmm_bf16(*good) == "" and not torch.isnan(out).any()
    q = pack_int8(torch.randn(40, 64))
    xq = torch.zeros(1, 64, dtype=torch.int8)
    err = ext.spmm_int8(xq, torch.ones(1), q.bitmaps, q.values[:5], q.strip_offsets, q.scales, 40, None,
                        torch.empty(1, 40, dtype=torch.bfloat16), "portable")
    assert "values has" in err


def test_corrupt_weight_is_refused_in_python_first():
    p = pack_bf16(torch.randn(16, 32))
    p.strip_offsets = torch.tensor([0, -1])
    with pytest.raises(RuntimeError, match="strip_offsets"):
        sparse_linear(torch.randn(1, 32), p, kernel="portable")
    p = pack_bf16(torch.randn(16, 32))
    p.bitmaps = p.bitmaps[:, :0]
    with pytest.raises(RuntimeError, match="bitmaps has shape"):
        sparse_linear(torch.randn(1, 32), p, kernel="portable")


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores")
def test_kernels_really_run_on_several_threads():
    """Built without -fopenmp, at::parallel_for silently runs on the calling thread only; the extension's
    streaming read reports how many threads took part."""
    from effllm_lib.sparse._build import load_extension

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        err, _, width = load_extension().stream_read(torch.ones(1 << 20, dtype=torch.int64))
        assert err == "" and width == 2
        torch.set_num_threads(1)
        assert load_extension().stream_read(torch.ones(1 << 20, dtype=torch.int64))[2] == 1
    finally:
        torch.set_num_threads(before)
