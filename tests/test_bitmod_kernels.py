"""The BitMoD LUT GEMV kernels against the fake-quantized float reference (float64 matmul of quantize_'s
weight), fuzzed over shapes, group sizes, ragged tails, token counts, weight dtypes and thread counts, with the
output poisoned (NaN) before every run. Every kernel this CPU can run is tested; the others must refuse with
a clear error. The Triton kernel has its own tests at the end (interpreter on CPU, or the GPU)."""

import os
import random

import pytest
import torch

from effllm_lib.bitmod.packed import BitMoDLinear, code_values, pack_weight, unpack_codes
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


def unrounded_weight(p):
    """value(type, code) x scale in float64, from packed.py's pure-torch unpacking (no rounding to the weight
    dtype): what the batch-1 path multiplies by."""
    codes, types = unpack_codes(p)
    values = code_values(p.bits).double()[types.unsqueeze(-1), codes][..., : p.group_size]
    return (values * p.scales.double().unsqueeze(-1)).flatten(1)[:, : p.in_features]


def test_fp16_patterns_hold_the_bitmod_values():
    """The kernel's decode, done here in plain Python: magnitude bits to 9-11 (4 bits) or 10-11 (3 bits), the
    sign to bit 15 of an FP16, the -0 pattern replaced by the type's special pattern; x 2^UNIT must give the
    BitMoD value of every code under every type (code_values, built from the value table independently)."""
    import numpy as np
    for bits in (3, 4):
        er, ea = triton_gemv.special_patterns(bits) if triton_gemv else (None, None)
        if er is None:
            pytest.skip("effllm_lib.bitmod.triton_gemv does not import")
        table = code_values(bits)
        for t in range(4):
            special = (ea if t >= 2 else er) | ((t & 1) << 15)
            for code in range(2 ** bits):
                mag, sign = code & ((1 << (bits - 1)) - 1), code >> (bits - 1)
                h = (mag << (9 if bits == 4 else 10)) | (sign << 15)
                h = special if h == 0x8000 else h
                value = float(np.array([h], dtype=np.uint16).view(np.float16)[0]) * 2.0 ** triton_gemv.UNIT_LOG2[bits]
                assert value == float(table[t, code]), (bits, t, code)


CASES = [  # bits, group, rows, cols, tokens, x dtype, weight dtype
    (4, 128, 40, 300, 1, torch.bfloat16, torch.bfloat16),     # ragged tail
    (3, 128, 33, 256, 5, torch.bfloat16, torch.bfloat16),
    (4, 64, 17, 200, 8, torch.float32, torch.float16),
    (3, 64, 17, 200, 2, torch.float32, torch.float16),
    (4, 64, 17, 200, 20, torch.float16, torch.bfloat16),
    (3, 256, 8, 512, 3, torch.float32, torch.bfloat16),       # 3 bits, sign words gathered per column
    (4, 256, 9, 512, 1, torch.float16, torch.float32),
    (4, 128, 70, 384, 100, torch.float16, torch.float16),     # > 64 tokens
    (4, 128, 24, 384, 32, torch.bfloat16, torch.bfloat16),
    (3, 128, 24, 384, 16, torch.bfloat16, torch.bfloat16),
]


@needs_triton
@pytest.mark.parametrize("path", ["batch1", "dot", "dot_swap"])
@pytest.mark.parametrize("bits,group_size,rows,cols,tokens,x_dtype,w_dtype", CASES)
def test_triton_against_references(path, bits, group_size, rows, cols, tokens, x_dtype, w_dtype):
    """Every path against the float64 reference x @ (value x scale) + bias (packed.py's pure-torch unpacking)
    with an FP32-accumulation bound plus the rounding of the output to x's dtype: both paths multiply by the
    group's scale after the sum. Tiles of 16 rows x 2 groups, so every case has several programs per row and a
    partial last tile in both directions; the tl.dot path with and without swapped operands."""
    device = triton_device()
    if device == "cpu" and path != "batch1" and x_dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter multiplies bf16 tl.dot operands as raw bits (triton-lang/triton#11584)")
    if device == "cpu" and tokens > 8 and path == "batch1":
        pytest.skip("one program per token: slow in the interpreter, the same code as tokens <= 8")
    fq, p = case(rows, cols, bits, group_size, w_dtype, rows)
    x = torch.randn(tokens, cols).to(x_dtype)
    bias = torch.randn(rows).to(x_dtype)
    pd = type(p)(p.codes.to(device), p.scales.to(device), p.type_ids.to(device), p.in_features, p.bits,
                 p.group_size, p.dtype)
    cfg = ({"use_dot": False, "block_m": 1, "block_n": 16, "groups_per_prog": 2, "swap_ab": False}
           if path == "batch1" else
           {"use_dot": True, "block_m": 16, "block_n": 16, "groups_per_prog": 2, "swap_ab": path == "dot_swap"})
    out = triton_gemv.bitmod_linear_triton(x.to(device), pd, bias.to(device), config=cfg)
    assert out.dtype == x_dtype and out.shape == (tokens, rows)
    w = unrounded_weight(p)
    ref = x.double() @ w.T + bias.double()
    bound = HALF_ULP[x_dtype] * ref.abs() + 4 * cols * 2.0 ** -24 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((out.cpu().double() - ref).abs() <= bound).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning needs a GPU")
@needs_triton
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("tokens", [1, 4, 64])
def test_triton_autotuned_call(bits, tokens):
    """The user-facing call (autotuned on first use, then a cache hit): right whichever path won."""
    fq, p = case(300, 1024, bits, 128, torch.bfloat16, tokens)
    pd = type(p)(p.codes.cuda(), p.scales.cuda(), p.type_ids.cuda(), p.in_features, p.bits, p.group_size, p.dtype)
    x = torch.randn(tokens, 1024).bfloat16()
    for _ in range(2):
        out = triton_gemv.bitmod_linear_triton(x.cuda(), pd).cpu().double()
        w = unrounded_weight(p)
        ref = x.double() @ w.T
        bound = 2.0 ** -8 * (ref.abs() + x.double().abs() @ w.abs().T)   # either path: x-dtype weight rounding
        assert ((out - ref).abs() <= bound + 1e-6).all()
    assert triton_gemv.last_config() is not None


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
    with pytest.raises(ValueError, match="unknown config keys"):
        triton_gemv.bitmod_linear_triton(torch.randn(1, 128), p, config={"blockn": 32})
    with pytest.raises(ValueError, match="block_m and block_n >= 16"):
        triton_gemv.bitmod_linear_triton(torch.randn(1, 128), p, config={"use_dot": True, "block_m": 8})


@needs_triton
@pytest.mark.parametrize("seed", range(4))
def test_triton_gemm_path_fuzzed(seed):
    """The tl.dot (GEMM) path over random shapes, ragged tails, group sizes, token counts and tiles (fp16 and
    fp32 activations: the interpreter cannot run bf16 tl.dot), against x @ (value x scale)."""
    device = triton_device()
    rnd = random.Random(100 + seed)
    bits, group_size = rnd.choice([3, 4]), rnd.choice([64, 128, 256])
    cols = rnd.choice([group_size * rnd.randint(1, 3), rnd.randint(group_size // 2, 3 * group_size)])
    rows, tokens = rnd.randint(1, 40), rnd.randint(2, 40)
    x_dtype = rnd.choice([torch.float16, torch.float32])
    fq, p = case(rows, cols, bits, group_size, rnd.choice([torch.bfloat16, torch.float16]), seed)
    x = torch.randn(tokens, cols).to(x_dtype)
    pd = type(p)(p.codes.to(device), p.scales.to(device), p.type_ids.to(device), p.in_features, p.bits,
                 p.group_size, p.dtype)
    cfg = {"use_dot": True, "block_m": rnd.choice([16, 32]), "block_n": rnd.choice([16, 32]),
           "groups_per_prog": rnd.choice([1, 2, 3]), "swap_ab": rnd.random() < 0.5}
    out = triton_gemv.bitmod_linear_triton(x.to(device), pd, config=cfg).cpu().double()
    w = unrounded_weight(p)
    ref = x.double() @ w.T
    bound = HALF_ULP[x_dtype] * ref.abs() + 4 * cols * 2.0 ** -24 * (x.double().abs() @ w.abs().T) + 1e-6
    assert ((out - ref).abs() <= bound).all(), (bits, group_size, rows, cols, tokens, cfg)
