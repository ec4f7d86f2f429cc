"""End-to-end decode at batch 1 with packed BitMoD weights, against torch bf16 and torch's int4 weight-only GEMM.

    dec = StaticDecoder(model, max_len=256)              # a transformers Llama/Qwen2 model, its linears as they are
    times, fed = decode_times(dec, prompt_ids, steps=64)  # seconds per step, tokens fed (greedy; CUDA graph on a GPU)

``StaticDecoder`` is a gpt-fast style decode step over a transformers model's own modules (embedding, RMSNorms,
rotary embedding, projections, lm_head): a static KV cache written with ``index_copy_`` at a position held in a
tensor, attention over the whole cache with a mask, greedy argmax written back into the input buffer. Nothing in
a step depends on a Python value, so on a GPU one step is captured as a CUDA graph and replayed: the launch
overhead of the ~10 kernels per layer does not hide the weight-streaming kernels. (transformers' own forward
builds masks and caches in Python each step; ``torch.compile(mode="reduce-overhead")`` would hide that too, at
minutes of compile time per model and variant, which the device's 10-minute calls cannot spare.) The linears are
whatever modules the model holds (``nn.Linear``, ``BitMoDLinear`` after ``quantize_(..., packed=True)``,
``Int4Linear``), or the ``overrides`` given by name, so variants of one big model share its other weights.

``Int4Linear`` is torch's own 4-bit weight-only path (the tinygemm kernel ``aten._weight_int4pack_mm`` that
gpt-fast uses on CUDA; ``aten._weight_int4pack_mm_for_cpu`` on CPU): asymmetric min/max 4-bit codes with a bf16
scale and zero per group (gpt-fast's ``group_quantize_tensor``). torchao is not installed on the device.

``bytes_per_token`` is what one decode step must read at least (every linear's stored bytes, one embedding row,
the KV cache at the given context); bytes over the measured read bandwidth is the step's floor.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from .packed import BitMoDLinear, PackedBitMoD, group_bytes

INT4_GROUPS = (128, 64, 32)
SUPPORTED_ARCHS = ("llama", "qwen2")


# ----------------------------------------------------------------------------------------------- torch int4
def int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-fast's asymmetric 4-bit group quantization: (codes int32 [n, k] in 0..15, scale+zero bf16
    [k / group, n, 2]) with weight ~= (code - 8) x scale + zero (tinygemm's convention)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    sz = torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)   # [k/g, n, 2]
    return q, sz


def int4_dequantize(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float weight tinygemm multiplies by: (code - 8) x scale + zero, [n, k] float32."""
    scale = sz[..., 0].float().T.repeat_interleave(group_size, 1)
    zero = sz[..., 1].float().T.repeat_interleave(group_size, 1)
    return (q.float() - 8) * scale + zero


class Int4Linear(nn.Module):
    """A bias-free linear layer on torch's int4 weight-only kernels (CUDA: tinygemm; CPU: its CPU port)."""

    def __init__(self, q: torch.Tensor, sz: torch.Tensor, group_size: int, bias: torch.Tensor | None = None):
        super().__init__()
        n, k = q.shape
        self.in_features, self.out_features, self.group_size = k, n, group_size
        if n % 16:
            raise ValueError(f"torch's int4 kernels need out_features divisible by 16, got {n}")
        if q.is_cuda:
            # the largest inner k-tiling the shape allows (tinygemm needs k divisible by 16 x tiles)
            tiles = next((t for t in (8, 4, 2) if k % (16 * t) == 0), None)
            if tiles is None:
                raise ValueError(f"tinygemm needs in_features divisible by 32, got {k}")
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        self.register_buffer("packed", packed)
        self.register_buffer("sz", sz.to(q.device))
        self.register_buffer("bias", None if bias is None else bias.detach().to(q.device, torch.bfloat16))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int | None = None) -> "Int4Linear":
        k = linear.in_features
        group_size = group_size or next((g for g in INT4_GROUPS if k % g == 0), None)
        if group_size is None:
            raise ValueError(f"no int4 group size in {INT4_GROUPS} divides in_features {k}")
        q, sz = int4_quantize(linear.weight.detach(), group_size)
        return cls(q, sz, group_size, linear.bias)

    @classmethod
    def random(cls, n: int, k: int, device, generator: torch.Generator | None = None, group_size: int = 128):
        """Random codes, scales and zeros: the kernel's speed does not depend on the values."""
        q = torch.randint(0, 16, (n, k), device=device, dtype=torch.int32, generator=generator)
        scale = torch.rand(k // group_size, n, device=device, generator=generator) * 2e-3 + 5e-4
        sz = torch.stack([scale, torch.zeros_like(scale)], -1).to(torch.bfloat16)
        return cls(q, sz, group_size)

    def nbytes(self) -> int:
        """Bytes the kernel reads: 4-bit codes plus the bf16 scale and zero of every group."""
        return self.out_features * self.in_features // 2 + self.sz.numel() * self.sz.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if x2.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.sz)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


# --------------------------------------------------------------------------------------------- random weights
def random_packed(n: int, k: int, bits: int, group_size: int = 128, device="cpu",
                  generator: torch.Generator | None = None) -> PackedBitMoD:
    """A packed BitMoD weight with random codes, type ids and FP16 scales (every bit pattern is a valid
    weight; the kernels have no data-dependent branches, so speed does not depend on the values)."""
    n_groups = -(-k // group_size)
    codes = torch.randint(0, 256, (n, n_groups * group_bytes(bits, group_size)), device=device, dtype=torch.uint8,
                          generator=generator)
    scales = (torch.rand(n, n_groups, device=device, generator=generator) * 2e-3 + 5e-4).half()
    types = torch.randint(0, 256, (n, -(-n_groups // 4)), device=device, dtype=torch.uint8, generator=generator)
    return PackedBitMoD(codes, scales, types, k, bits, group_size, torch.bfloat16)


def decoder_linears(model: nn.Module) -> list[str]:
    """Names of every projection a decode step runs, lm_head last."""
    names = []
    for i, layer in enumerate(model.model.layers):
        for part, subs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            names += [f"model.layers.{i}.{part}.{s}" for s in subs if hasattr(getattr(layer, part), s)]
    return names + ["lm_head"]


@torch.no_grad()
def random_overrides(model: nn.Module, kind: str, bits: int = 4, group_size: int = 128, seed: int = 0,
                     names: list[str] | None = None) -> dict:
    """{linear name: module} with random weights of ``kind`` ("bitmod" or "int4") for every projection of
    ``model`` (or those in ``names``; its shapes and device): variants of a random model sharing its other
    weights."""
    if kind not in ("bitmod", "int4"):
        raise ValueError(f"kind must be 'bitmod' or 'int4', got {kind!r}")
    device = model.lm_head.weight.device
    g = torch.Generator(device=device).manual_seed(seed)
    out, first = {}, {}
    for name in names or decoder_linears(model):
        lin = model.get_submodule(name)
        n, k = lin.out_features, lin.in_features
        if (n, k) in first:   # a copy in its own memory (no cache sharing), made faster than new random codes
            out[name] = copy.deepcopy(first[n, k])
        elif kind == "bitmod":
            out[name] = first[n, k] = BitMoDLinear.from_packed(random_packed(n, k, bits, group_size, device, g))
        else:
            out[name] = first[n, k] = Int4Linear.random(n, k, device, g)
    return out


# ---------------------------------------------------------------------------------------------- decode step
class StaticDecoder(nn.Module):
    """One greedy decode step of a transformers Llama / Qwen2 model with a static KV cache (see the module doc).

    ``step(tok, pos)``: tok int64 [1, 1], pos int64 [1]; returns float32 logits [1, vocab]. ``advance(tok,
    pos)`` runs a step, then writes the argmax into ``tok`` and adds one to ``pos`` in place (what a CUDA graph
    replays)."""

    def __init__(self, model: nn.Module, max_len: int, overrides: dict | None = None):
        super().__init__()
        cfg = model.config
        if cfg.model_type not in SUPPORTED_ARCHS:
            raise ValueError(f"StaticDecoder runs {SUPPORTED_ARCHS} models, not {cfg.model_type!r}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        overrides = dict(overrides or {})
        unknown = set(overrides) - set(decoder_linears(model))
        if unknown:
            raise ValueError(f"overrides name no projection of the model: {sorted(unknown)[:3]}")

        def get(name):
            return overrides.get(name) or model.get_submodule(name)

        inner = model.model
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.lm_head = get("lm_head")
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_len = max_len
        w = self.embed.weight
        self.layers = []   # plain lists of module references (taken now: later swaps in `model` don't leak in)
        for i, layer in enumerate(inner.layers):
            p = f"model.layers.{i}."
            self.layers.append(dict(
                in_norm=layer.input_layernorm, post_norm=layer.post_attention_layernorm, act=layer.mlp.act_fn,
                **{s: get(p + "self_attn." + s) for s in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{s: get(p + "mlp." + s) for s in ("gate_proj", "up_proj", "down_proj")}))
        shape = (1, self.n_kv, max_len, self.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in self.layers]
        self.positions = torch.arange(max_len, device=w.device)
        self.modules_by_name = {n: get(n) for n in decoder_linears(model)}

    def step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        h = self.embed(tok)                                   # [1, 1, hidden]
        cos, sin = self.rotary(h, pos.view(1, 1))
        mask = (self.positions <= pos).view(1, 1, 1, -1)      # the filled part of the cache
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        for L, kc, vc in zip(self.layers, self.k_cache, self.v_cache):
            x = L["in_norm"](h)
            q = L["q_proj"](x).view(1, 1, nh, hd).transpose(1, 2)
            k = L["k_proj"](x).view(1, 1, nkv, hd).transpose(1, 2)
            v = L["v_proj"](x).view(1, 1, nkv, hd).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kc.index_copy_(2, pos, k.to(kc.dtype))
            vc.index_copy_(2, pos, v.to(vc.dtype))
            a = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=nkv != nh)
            h = h + L["o_proj"](a.transpose(1, 2).reshape(1, 1, nh * hd))
            x = L["post_norm"](h)
            h = h + L["down_proj"](L["act"](L["gate_proj"](x)) * L["up_proj"](x))
        return self.lm_head(self.norm(h))[:, -1].float()

    def advance(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.step(tok, pos)
        tok.copy_(logits.argmax(-1).view(1, 1))
        pos.add_(1)
        return logits


def linear_nbytes(module: nn.Module) -> int:
    if isinstance(module, BitMoDLinear):
        return module.footprint()["bytes"]
    if isinstance(module, Int4Linear):
        return module.nbytes()
    if isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    raise TypeError(f"unknown linear module {type(module).__name__}")


def bytes_per_token(dec: StaticDecoder, context: int) -> dict:
    """The least a decode step at ``context`` tokens must read: stored bytes of every projection (lm_head
    included), one embedding row, the K and V cache up to ``context``."""
    linears = sum(linear_nbytes(m) for m in dec.modules_by_name.values())
    w = dec.embed.weight
    embed_row = w.shape[1] * w.element_size()
    kv = 2 * len(dec.layers) * dec.n_kv * dec.head_dim * w.element_size() * context
    return {"linears": linears, "embed_row": embed_row, "kv_cache": kv, "total": linears + embed_row + kv}


# --------------------------------------------------------------------------------------------------- timing
@torch.no_grad()
def prefill(dec: StaticDecoder, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed the prompt one token at a time; returns (tok, pos, last logits) ready for ``advance``."""
    if not 1 <= len(prompt) < dec.max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_len {dec.max_len}")
    dev = dec.positions.device
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    for i, t in enumerate(prompt):
        tok.fill_(int(t))
        pos.fill_(i)
        logits = dec.step(tok, pos)
    tok.copy_(logits.argmax(-1).view(1, 1))
    pos.fill_(len(prompt))
    return tok, pos, logits


class GraphedStep:
    """``dec.advance`` captured once as a CUDA graph over fixed tok / pos buffers (warm-up steps first, on a side
    stream, so autotuning and lazy allocations happen outside the capture)."""

    def __init__(self, dec: StaticDecoder, tok: torch.Tensor, pos: torch.Tensor, warmup: int = 3):
        self.tok, self.pos = tok, pos
        start_tok, start_pos = tok.clone(), pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(warmup):
                dec.advance(tok, pos)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        tok.copy_(start_tok)
        pos.copy_(start_pos)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = dec.advance(tok, pos)
        torch.cuda.synchronize()

    def __call__(self):
        self.graph.replay()


@torch.no_grad()
def decode_times(dec: StaticDecoder, prompt: list[int], steps: int, step_fn: "GraphedStep | None" = None,
                 graph: bool | None = None) -> tuple[list[float], list[int]]:
    """(seconds of each of ``steps`` greedy decode steps after the prompt, the token fed to each step).

    On a GPU (``graph`` None or True) a step is one replay of a CUDA graph, timed by CUDA events around it; on
    CPU a Python call timed by ``perf_counter``. ``step_fn``: a ``GraphedStep`` built earlier for ``dec`` (its
    buffers are reset here to the prompt's end, so one graph serves every round)."""
    if len(prompt) + steps > dec.max_len:
        raise ValueError(f"prompt {len(prompt)} + steps {steps} exceed max_len {dec.max_len}")
    cuda = dec.positions.is_cuda
    graph = cuda if graph is None else graph
    if graph and not cuda:
        raise ValueError("CUDA graphs need the model on a GPU")
    tok, pos, _ = prefill(dec, prompt)
    if step_fn is not None:
        step_fn.tok.copy_(tok)
        step_fn.pos.copy_(pos)
        tok, pos = step_fn.tok, step_fn.pos
    elif graph:
        step_fn = GraphedStep(dec, tok, pos)
    else:
        def step_fn():
            dec.advance(tok, pos)
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
        fed = torch.empty(steps, dtype=torch.long, device=tok.device)
        torch.cuda.synchronize()
        for i in range(steps):
            fed[i] = tok.view(())
            starts[i].record()
            step_fn()
            ends[i].record()
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in zip(starts, ends)], fed.tolist()
    times, fed = [], []
    for _ in range(steps):
        fed.append(int(tok))
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return times, fed


# ------------------------------------------------------------------------------------------ where time goes
KERNEL_CLASSES = (   # (class, substrings of the kernel / op name), first match wins; lower-case
    ("bitmod_triton", ("bitmod",)),
    ("int4_tinygemm", ("tinygemm", "int4pack", "_weight_int4")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention", "cudnn_sdp")),
    ("matmul", ("gemv", "gemm", "cutlass", "cublas", "nvjet", "sm90_xmma", "aten::mm", "aten::addmm",
                "aten::linear", "aten::matmul", "aten::bmm")),
)


def kernel_class(name: str) -> str:
    """The class of a GPU kernel (or, on CPU, an aten op) by its name: bitmod_triton, int4_tinygemm,
    attention, matmul, or other (norms, rotary, activation, copies, argmax: the elementwise glue)."""
    n = name.lower()
    for cls, keys in KERNEL_CLASSES:
        if any(k in n for k in keys):
            return cls
    return "other"


@torch.no_grad()
def step_profile(dec: "StaticDecoder", prompt: list[int], steps: int = 8) -> "pd.DataFrame":
    """Where a decode step's time goes: ``steps`` eager steps after the prompt under torch.profiler, device
    time per step by ``kernel_class`` (GPU: CUDA kernels; CPU: self time of aten ops, plus ``outside_aten``: the
    profiled wall time they leave, i.e. the CPU BitMoD kernel, which is no aten op, and Python; profiler overhead
    included, so CPU rows are shares, not timings), with the number of kernels per step. A CUDA graph replays the same kernels back to back, so kernel time per step is what a
    replay costs without launch gaps: the sum over classes against the measured step time says how much is
    kernels and how much is gaps, and the ``other`` row prices the unfused glue between projections."""
    import pandas as pd
    from torch.profiler import ProfilerActivity, profile

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cuda = dec.positions.is_cuda
    tok, pos, _ = prefill(dec, prompt)
    dec.advance(tok, pos)  # warm: autotuning and lazy allocations outside the trace
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.advance(tok, pos)
        if cuda:
            torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    rows = {}
    for ev in prof.events():
        on_device = getattr(ev, "device_type", None) == torch.autograd.DeviceType.CUDA
        if cuda and not on_device:
            continue
        if not cuda and (not ev.name.startswith("aten::") or on_device):
            continue
        us = ev.time_range.elapsed_us() if cuda else ev.self_cpu_time_total
        cls = kernel_class(ev.name)
        r = rows.setdefault(cls, {"kernel_class": cls, "us_per_step": 0.0, "kernels_per_step": 0.0})
        r["us_per_step"] += us / steps
        r["kernels_per_step"] += 1 / steps
    if not cuda:   # the CPU BitMoD kernel and Python are no aten ops: the wall time they leave
        rest = wall_us / steps - sum(r["us_per_step"] for r in rows.values())
        rows["outside_aten"] = {"kernel_class": "outside_aten", "us_per_step": max(rest, 0.0),
                                "kernels_per_step": float("nan")}
    df = pd.DataFrame(list(rows.values()), columns=["kernel_class", "us_per_step", "kernels_per_step"])
    total = df.us_per_step.sum()
    df["share"] = df.us_per_step / total if total > 0 else float("nan")
    return df.sort_values("us_per_step", ascending=False, ignore_index=True)


def spread(times: list[float]) -> dict:
    s = sorted(times)
    med = statistics.median(s)
    return {"ms_per_token": 1e3 * med, "p10_ms": 1e3 * s[len(s) // 10],
            "p90_ms": 1e3 * s[min(len(s) - 1, 9 * len(s) // 10)],
            "tokens_per_s": 1.0 / med, "steps": len(s)}
