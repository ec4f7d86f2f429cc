"""The BitMoD LUT GEMV kernels against the fake-quantized float reference (float64 matmul of quantize_'s
weight), fuzzed over shapes, group sizes, ragged tails, token counts, weight dtypes and thread counts, with the
output poisoned (NaN) before every run. Every kernel this CPU can run is tested; the others must refuse with
a clear error. The Triton kernel has its own tests at the end (interpreter on CPU, or the GPU)."""

import os
import random

import pytest
import torch

from effllm_lib.bitmod.packed import BitMoDLinear, pack_weight
from effllm_lib.bitmod.quantize import quantize_tensor

cpu_gemv = pytest.importorskip("effllm_lib.bitmod.cpu_gemv")


@pytest.fixture(scope="module")
def kernels():
    try:
        return cpu_gemv.available_kernels()
    except RuntimeError as exc:  # no compiler here: the kernels can't be tested, say why
        pytest.skip(f"BitMoD CPU extension unavailable: {exc}")


def case(rows, cols, bits, group_size, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-1, 0.5, rows).unsqueeze(1) * 0.02
    w[:, torch.randint(0, cols, (3,), generator=g)] *= 8        # outlier columns: all four types show up
    fq = quantize_tensor(w.to(dtype), bits, "bitmod", group_size).weight
    return fq, pack_weight(fq, bits, group_size)


def check(kernel, fq, p, tokens, bias, threads, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, fq.shape[1], generator=g)
    out = torch.full((tokens, fq.shape[0]), float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = cpu_gemv.bitmod_linear_cpu(x, p, bias, kernel=kernel, out=out)
    finally:
        torch.set_num_threads(before)
    ref = x.double() @ fq.double().T + (0 if bias is None else bias.double())
    # FP32 accumulation over K terms: |error| <= ~K u sum|x w|; a wrongly rounded table entry (2^-9) is far above
    bound = 4 * fq.shape[1] * 2.0 ** -24 * (x.double().abs() @ fq.double().abs().T) + 1e-30
    assert torch.isfinite(y).all() and y is not None
    assert ((y.double() - ref).abs() <= bound).all(), (kernel, tuple(fq.shape), p.bits, p.group_size, tokens)


@pytest.mark.parametrize("seed", range(12))
def test_fuzz_against_fake_quantized_reference(kernels, seed):
    rnd = random.Random(seed)
    bits = rnd.choice([3, 4])
    dtype = rnd.choice([torch.bfloat16, torch.float16, torch.float32])
    group_size = rnd.choice([64, 128, 256])
    cols = rnd.choice([group_size * rnd.randint(1, 4), rnd.randint(group_size // 2, 5 * group_size)])  # ragged tail
    rows = rnd.randint(1, 97)
    fq, p = case(rows, cols, bits, group_size, dtype, seed)
    bias = torch.randn(rows) if rnd.random() < 0.5 else None
    for kernel in kernels:
        for tokens in (1, rnd.randint(2, 8), rnd.randint(9, 19)):
            check(kernel, fq, p, tokens, bias, rnd.choice([1, 2, 3]), seed)


@pytest.mark.parametrize("group_size", [8, 30, 50, 100])
def test_portable_kernel_any_group_size(kernels, group_size):
    fq, p = case(33, 3 * group_size + 7, 3 if group_size % 20 else 4, group_size, torch.bfloat16, group_size)
    check("portable", fq, p, 3, None, 2, 0)
    assert cpu_gemv.resolve_kernel("auto", group_size) == "portable"
    for k in kernels[1:]:
        with pytest.raises(ValueError, match="multiple of 64"):
            cpu_gemv.resolve_kernel(k, group_size)


def test_kernels_this_cpu_lacks_refuse_clearly(kernels):
    for k in set(cpu_gemv.CPU_KERNELS) - set(kernels):
        with pytest.raises(RuntimeError, match="cannot run on this CPU"):
            cpu_gemv.resolve_kernel(k, 128)
    with pytest.raises(ValueError, match="unknown CPU kernel"):
        cpu_gemv.resolve_kernel("amx", 128)
    fq, p = case(4, 128, 4, 128, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="features"):
        cpu_gemv.bitmod_linear_cpu(torch.randn(2, 100), p)
    with pytest.raises(TypeError, match="floating"):
        cpu_gemv.bitmod_linear_cpu(torch.ones(2, 128, dtype=torch.int32), p)
    # the C++ side checks what it is handed, too (and answers with a message, not a crash)
    err = cpu_gemv.load_extension().gemv(torch.zeros(1, 128), p.codes.int(), p.scales, p.type_ids,
                                         torch.zeros(4, 16), 4, 128, 1, None, torch.zeros(1, 4), "portable")
    assert "codes must be a contiguous 2-D uint8" in err
    err = cpu_gemv.load_extension().gemv(torch.zeros(9, 128), p.codes, p.scales, p.type_ids,
                                         torch.zeros(4, 16), 4, 128, 1, None, torch.zeros(9, 4), "portable")
    assert "1 to 8 rows" in err


def test_module_forward_matches_reference_path(kernels):
    fq, p = case(40, 300, 4, 128, torch.bfloat16, 5)
    layer = BitMoDLinear.from_packed(p, torch.randn(40).to(torch.bfloat16), kernel="cpu")
    ref_layer = BitMoDLinear.from_packed(p, layer.bias, kernel="reference")
    x = torch.randn(2, 3, 300)
    y, ref = layer(x), ref_layer(x)
    assert y.shape == (2, 3, 40) and torch.allclose(y, ref, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ Triton
triton_gemv = None
try:
    from effllm_lib.bitmod import triton_gemv  # noqa: F811
except ImportError:
    pass
needs_triton = pytest.mark.skipif(triton_gemv is None or not triton_gemv.triton_available(),
                                  reason="triton not installed")


def triton_device():
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("no GPU; set TRITON_INTERPRET=1 to run the Triton kernel in its interpreter on CPU")


HALF_ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


@needs_triton
@pytest.mark.parametrize("bits,group_size,rows,cols,tokens,x_dtype,w_dtype", [
    (4, 128, 40, 300, 1, torch.bfloat16, torch.bfloat16),     # GEMV path, ragged tail
    (3, 128, 33, 256, 5, torch.bfloat16, torch.bfloat16),
    (4, 64, 17, 200, 8, torch.float32, torch.float16),
    (4, 64, 17, 200, 20, torch.float16, torch.bfloat16),      # tl.dot path
    (3, 256, 8, 512, 64, torch.float32, torch.bfloat16),
    (4, 128, 70, 384, 100, torch.float16, torch.float16),     # > 64 tokens: chunks of 64
    (4, 128, 24, 384, 32, torch.bfloat16, torch.bfloat16),    # bf16 tl.dot: GPU only
    (3, 128, 24, 384, 16, torch.bfloat16, torch.bfloat16),
])
def test_triton_against_fake_quantized_reference(bits, group_size, rows, cols, tokens, x_dtype, w_dtype):
    device = triton_device()
    if device == "cpu" and x_dtype == torch.bfloat16 and tokens > 8:
        pytest.skip("Triton's interpreter multiplies bf16 tl.dot operands as raw bits (triton-lang/triton#11584)")
    fq, p = case(rows, cols, bits, group_size, w_dtype, rows)
    x = torch.randn(tokens, cols).to(x_dtype)
    bias = torch.randn(rows).to(x_dtype)
    pd = type(p)(p.codes.to(device), p.scales.to(device), p.type_ids.to(device), p.in_features, p.bits,
                 p.group_size, p.dtype)
    out = triton_gemv.bitmod_linear_triton(x.to(device), pd, bias.to(device))
    assert out.dtype == x_dtype and out.shape == (tokens, rows)
    # the contract of F.linear(x, W.to(x.dtype), bias): the result rounded once to x's dtype, FP32 accumulation
    w = fq.to(x_dtype).double()
    ref = x.double() @ w.T + bias.double()
    bound = HALF_ULP[x_dtype] * ref.abs() + 4 * cols * 2.0 ** -24 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((out.cpu().double() - ref).abs() <= bound).all()


@needs_triton
def test_triton_bad_inputs():
    fq, p = case(8, 100, 4, 50, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="power-of-two group size"):
        triton_gemv.bitmod_linear_triton(torch.randn(1, 100), p)
    fq, p = case(8, 128, 4, 128, torch.bfloat16, 0)
    with pytest.raises(ValueError, match="features"):
        triton_gemv.bitmod_linear_triton(torch.randn(1, 100), p)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        triton_gemv.bitmod_linear_triton(torch.ones(1, 128, dtype=torch.int32), p)
