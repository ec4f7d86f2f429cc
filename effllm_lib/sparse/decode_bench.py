"""End-to-end decode latency at batch 1: stock PyTorch bf16 vs the sparse kernels, with each model's ceiling.

    df = decode_latency(["smollm2-135m", "llama3-8b"], sparsity=0.5, kernels=["auto"], steps=32)

Models are built from their exact configs (the packaged SmolLM2-135M, Gemma-3-270M and Qwen2.5-1.5B, and
Llama-3-8B) with random weights, and every decoder linear gets a random 50 % (``sparsity``) unstructured mask:
the time of a decode step does not depend on the weight values, only on the bytes moved and the work per
byte, which the mask fixes (the accuracy of real pruned weights is measured separately, on the real models).
Random weights need no multi-GB asset, so the same run works on a machine that can only receive small files.

Per model and implementation (``torch_bf16``; ``sparse_<kernel>``): one prefill of ``prompt`` tokens, then
``steps`` decode steps through transformers' own forward and cache (``warmup`` steps untimed), in ``rounds``
rounds whose order alternates between implementations; the median per-token latency with its 10th/90th
percentiles. Apart from that: ``lm_head_ms`` (the dense output layer alone), ``linears_ms`` (every decoder
linear called once in model order with inputs of the right shape: the weight-streaming part) and
``framework_ms`` = token - linears - lm_head (attention, norms, rotary, cache, Python and HF overhead).

The ceiling of a model is its bytes per token dense / bytes per token sparse, lm_head and the KV cache read
at the mean context counted in both (lm_head stays dense): if a step were pure weight streaming, that is the
largest speed-up compression can give. ``of_ceiling`` = measured speed-up / ceiling.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .sparse_linear import SparseLinear
from .sparsify import FusedSparseLinear, LinearSlice, SparseGatedMLP, SparsifyConfig, hf_targets, sparsify_

# exact shapes (checked against models.MODELS params in the tests); rope/eps values do not change speed
MODEL_CONFIGS = {
    "smollm2-135m": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                                   tie_word_embeddings=True, max_position_embeddings=8192, rope_theta=100000.0)),
    "gemma3-270m": ("gemma3_text", dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                        vocab_size=262144, tie_word_embeddings=True, sliding_window=512,
                                        query_pre_attn_scalar=256, max_position_embeddings=32768)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, head_dim=128, vocab_size=151936,
                                   tie_word_embeddings=False, max_position_embeddings=32768)),
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                                tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0)),
}


def model_config(name: str, layers: int | None = None):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODEL_CONFIGS)}")
    arch, kw = MODEL_CONFIGS[name]
    kw = dict(kw)
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma3_text": Gemma3TextConfig}[arch]
    return cls(**kw)


@torch.no_grad()
def random_model(name: str, sparsity: float = 0.5, layers: int | None = None, seed: int = 0) -> nn.Module:
    """A bf16 model of ``name``'s exact shape, random weights, decoder linears with a random ``sparsity``
    mask. Values come from a 4M-element random pool copied at random offsets (filling billions of weights with
    fresh random numbers would take minutes and change nothing the kernels' speed depends on)."""
    from transformers import AutoModelForCausalLM

    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    config = model_config(name, layers)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise normally (slower, same result for timing)
        import contextlib

        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 22, generator=g) * 0.02).bfloat16()
    masked = pool.masked_fill(torch.rand(pool.shape, generator=g) < sparsity, 0)
    linears = set(hf_targets(model))
    for pname, p in model.named_parameters():
        flat = p.view(-1)
        if p.dim() == 1:
            flat.fill_(1.0 if "norm" in pname else 0.0)
            continue
        src = masked if pname.rsplit(".", 1)[0] in linears else pool
        chunk = src.numel() // 2
        for i in range(0, flat.numel(), chunk):
            off = int(torch.randint(0, src.numel() - chunk, (1,), generator=g))
            n = min(chunk, flat.numel() - i)
            flat[i:i + n].copy_(src[off:off + n])
    return model.eval()


def _percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@torch.no_grad()
def decode_steps(model: nn.Module, prompt: torch.Tensor, steps: int, warmup: int,
                 progress: Callable | None = None) -> tuple[float, list[float]]:
    """(prefill seconds, per-token seconds of the timed steps): greedy, transformers' forward and cache."""
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    prefill = time.perf_counter() - t0
    pkv, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = model(input_ids=nxt, past_key_values=pkv, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        dt = time.perf_counter() - t0
        pkv = out.past_key_values
        if i >= warmup:
            times.append(dt)
        if progress:
            progress()
    return prefill, times


class DenseAMXLinear(nn.Module):
    """The dense AMX bf16 kernel behind a linear layer: the strongest dense baseline on an AMX CPU (the same tile
    order and threading as the sparse AMX kernel, every value kept). Benchmark-only: no save/reload."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from .format import pack_dense_bf16_vnni

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack_dense_bf16_vnni(linear.weight.detach()), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().bfloat16()
        self.weight_bytes = linear.weight.numel() * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .sparse_linear import dense_linear_amx

        return dense_linear_amx(x, self.packed, self.out_features, self.bias).to(x.dtype)


def dense_amx_model(dense: nn.Module) -> nn.Module:
    """A copy of ``dense`` whose decoder linears (not lm_head) run on the dense AMX kernel."""
    model = copy.deepcopy(dense)
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child is not head:
                setattr(parent, name, DenseAMXLinear(child))
    return model


def linear_blocks(model: nn.Module) -> list[tuple[nn.Module, int, Callable]]:
    """The weight-carrying calls of one decode step in model order: (module, in_features, call)."""
    blocks = []
    for mod in model.modules():
        if isinstance(mod, FusedSparseLinear):
            def call(x, m=mod):
                out = m.outputs(x)
                m._stash = None
                return out
            blocks.append((mod, mod.in_features, call))
        elif isinstance(mod, SparseGatedMLP):
            blocks.append((mod, mod.gate_up.in_features, mod))
        elif isinstance(mod, SparseLinear) and not _inside_mlp(model, mod):
            blocks.append((mod, mod.in_features, mod))
        elif isinstance(mod, DenseAMXLinear) or (isinstance(mod, nn.Linear)
                                                 and mod is not model.get_output_embeddings()):
            blocks.append((mod, mod.in_features, mod))
    return blocks


def _inside_mlp(model, mod) -> bool:
    return any(isinstance(m, SparseGatedMLP) and mod in (m.gate_up, m.down_proj) for m in model.modules())


@torch.no_grad()
def component_times(model: nn.Module, repeats: int = 5) -> dict:
    """Median seconds of (all decoder linears in order, lm_head) at batch 1."""
    blocks = linear_blocks(model)
    xs = [torch.randn(1, 1, k).bfloat16() for _, k, _ in blocks]
    head = model.get_output_embeddings()
    h = torch.randn(1, 1, head.in_features).bfloat16()
    lin, lm = [], []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for (_, _, call), x in zip(blocks, xs):
            call(x)
        t1 = time.perf_counter()
        head(h)
        t2 = time.perf_counter()
        if r:
            lin.append(t1 - t0)
            lm.append(t2 - t1)
    return {"linears_s": statistics.median(lin), "lm_head_s": statistics.median(lm)}


def bytes_per_token(model: nn.Module, context: int) -> dict:
    """Weight bytes one decode step streams (decoder linears; lm_head) and the KV cache read at ``context``."""
    lin = 0
    for mod in model.modules():
        if isinstance(mod, SparseLinear):
            lin += mod.weight.nbytes()
        elif isinstance(mod, DenseAMXLinear):
            lin += mod.weight_bytes
        elif isinstance(mod, nn.Linear) and mod is not model.get_output_embeddings():
            lin += mod.weight.numel() * mod.weight.element_size()
    head = model.get_output_embeddings().weight
    c = model.config
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2 * context
    return {"linear_bytes": lin, "lm_head_bytes": head.numel() * head.element_size(), "kv_bytes": kv}


def decode_latency(models: list[str], sparsity: float = 0.5, kernels: list[str] = ("auto",), prompt: int = 128,
                   steps: int = 32, warmup: int = 4, rounds: int = 3, layers: int | None = None,
                   dense_amx: bool = False, log: Callable[[str], None] = print) -> pd.DataFrame:
    """One row per model x implementation (see the module docstring)."""
    from tqdm.auto import tqdm

    rows = []
    for name in models:
        t0 = time.perf_counter()
        dense = random_model(name, sparsity, layers)
        sparse = sparsify_(copy.deepcopy(dense), SparsifyConfig(sparsity=sparsity, method="none"))
        log(f"{name}: built and packed in {time.perf_counter() - t0:.0f} s")
        ids = torch.randint(0, dense.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
        impls = {"torch_bf16": (dense, None)}
        if dense_amx:  # the strongest dense baseline where AMX exists
            impls["dense_amx"] = (dense_amx_model(dense), None)
        impls |= {f"sparse_{k}": (sparse, k) for k in kernels}
        per = {i: {"tok": [], "prefill": [], "comp": []} for i in impls}
        bar = tqdm(total=rounds * len(impls) * (steps + warmup), desc=name, mininterval=2)
        for r in range(rounds):
            order = list(impls)[r % len(impls):] + list(impls)[: r % len(impls)]
            for impl in order:
                m, k = impls[impl]
                with _forced_kernel(k):
                    pre, toks = decode_steps(m, ids, steps, warmup, progress=bar.update)
                    per[impl]["comp"].append(component_times(m, repeats=3))
                per[impl]["tok"] += toks
                per[impl]["prefill"].append(pre)
        bar.close()
        ctx = prompt + warmup + steps // 2
        b_dense, b_sparse = bytes_per_token(dense, ctx), bytes_per_token(sparse, ctx)
        total_dense = sum(b_dense.values())
        ceiling = total_dense / sum(b_sparse.values())
        base = statistics.median(per["torch_bf16"]["tok"])
        base_prefill = statistics.median(per["torch_bf16"]["prefill"])
        for impl, d in per.items():
            b = b_sparse if impl.startswith("sparse_") else b_dense
            tok = statistics.median(d["tok"])
            lin = statistics.median(c["linears_s"] for c in d["comp"])
            head = statistics.median(c["lm_head_s"] for c in d["comp"])
            speedup = base / tok
            rows.append({"model": name, "impl": impl, "sparsity": sparsity if impl.startswith("sparse_") else 0.0,
                         "mask_sparsity": sparsity, "layers": dense.config.num_hidden_layers,
                         "threads": torch.get_num_threads(), "prompt": prompt, "steps": steps, "rounds": rounds,
                         "token_ms": tok * 1e3, "token_p10_ms": _percentile(d["tok"], 0.1) * 1e3,
                         "token_p90_ms": _percentile(d["tok"], 0.9) * 1e3,
                         "prefill_ms": statistics.median(d["prefill"]) * 1e3,
                         "prefill_speedup": base_prefill / statistics.median(d["prefill"]),
                         "linears_ms": lin * 1e3, "lm_head_ms": head * 1e3,
                         "framework_ms": (tok - lin - head) * 1e3,
                         **{k: v for k, v in b.items()}, "bytes_per_token": sum(b.values()),
                         "read_gbs": sum(b.values()) / tok / 1e9,
                         "speedup_vs_torch": speedup, "ceiling": ceiling,
                         "of_ceiling": speedup / ceiling if impl.startswith("sparse_") else float("nan")})
        best_dense = min(statistics.median(per[i]["tok"]) for i in per if not i.startswith("sparse_"))
        for row in rows[-len(per):]:
            row["speedup_vs_best_dense"] = best_dense / (row["token_ms"] / 1e3)
        log(pd.DataFrame(rows[-len(per):])[["model", "impl", "token_ms", "token_p10_ms", "token_p90_ms",
                                            "linears_ms", "lm_head_ms", "framework_ms", "speedup_vs_torch",
                                            "speedup_vs_best_dense", "ceiling", "of_ceiling", "prefill_speedup"]].round(3).to_string())
        del dense, sparse, impls
    return pd.DataFrame(rows)


def e2e_claims(df: pd.DataFrame, model: str = "llama3-8b", sparsity: float = 0.5) -> pd.DataFrame:
    """The end-to-end claim rows of data/paper/sparamx.csv from a ``decode_latency`` frame (batch 1).

    ``e2e_speedup_vs_pytorch``: torch bf16 ms per token / the fastest sparse kernel's. ``avx_vs_amx_batch1_e2e``:
    AMX / AVX-512 sparse ms per token (needs both forced kernels in the frame). The reason states why the speed-up
    can exceed the bytes ceiling: the ceiling assumes both sides read at the same rate, and torch's bf16 GEMV does
    not (its ``read_gbs`` is in the row).
    """
    sel = df[(df.model == model) & (df.mask_sparsity == sparsity)].set_index("impl")
    if "torch_bf16" not in sel.index or len(sel) < 2:
        raise ValueError(f"e2e_claims: need torch_bf16 and a sparse kernel for {model} at {sparsity}; "
                         f"have {sorted(sel.index)}")
    t = sel.loc["torch_bf16"]
    sparse = sel[[i.startswith("sparse_") for i in sel.index]]
    best = sparse.loc[sparse.token_ms.idxmin()]
    rows = [{"claim_id": "e2e_speedup_vs_pytorch", "ours": float(t.token_ms / best.token_ms), "status": "measured",
             "reason": (f"{model} shape, random weights, {sparsity:.0%} random mask, batch 1, {int(best.threads)} "
                        f"threads, {best.name}: {best.token_ms:.1f} ms/token (p10-p90 {best.token_p10_ms:.1f}-"
                        f"{best.token_p90_ms:.1f}) vs torch bf16 {t.token_ms:.1f} ({t.token_p10_ms:.1f}-"
                        f"{t.token_p90_ms:.1f}); bytes ceiling {best.ceiling:.2f}x (lm_head dense) is exceeded "
                        f"because torch bf16 reads at {t.read_gbs:.0f} GB/s and the sparse model at "
                        f"{best.read_gbs:.0f} GB/s"
                        + (f"; vs the dense AMX kernel ({sel.loc['dense_amx'].token_ms:.1f} ms/token) "
                           f"{sel.loc['dense_amx'].token_ms / best.token_ms:.2f}x" if "dense_amx" in sel.index
                           else ""))}]
    if {"sparse_amx", "sparse_avx512"} <= set(sel.index):
        a, v = sel.loc["sparse_amx"], sel.loc["sparse_avx512"]
        rows.append({"claim_id": "avx_vs_amx_batch1_e2e", "ours": float(a.token_ms / v.token_ms),
                     "status": "measured",
                     "reason": (f"AMX {a.token_ms:.1f} ms/token (p10-p90 {a.token_p10_ms:.1f}-{a.token_p90_ms:.1f})"
                                f" vs AVX-512 {v.token_ms:.1f} ({v.token_p10_ms:.1f}-{v.token_p90_ms:.1f}), "
                                f"{int(a.threads)} threads, end to end; a ratio below 1 means AMX is ahead")})
    return pd.DataFrame(rows)


class _forced_kernel:
    """Run the sparse model with one kernel for every call (``EFFLLM_SPARSE_AUTO``); "auto" = calibrated."""

    def __init__(self, kernel: str | None):
        self.kernel = kernel

    def __enter__(self):
        self.before = os.environ.get("EFFLLM_SPARSE_AUTO")
        if self.kernel not in (None, "auto"):
            os.environ["EFFLLM_SPARSE_AUTO"] = self.kernel
        elif self.before is not None:
            del os.environ["EFFLLM_SPARSE_AUTO"]

    def __exit__(self, *exc):
        if self.before is None:
            os.environ.pop("EFFLLM_SPARSE_AUTO", None)
        else:
            os.environ["EFFLLM_SPARSE_AUTO"] = self.before


@torch.no_grad()
def decode_summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per model of a ``decode_latency`` table: the fastest sparse kernel against stock PyTorch and against
    the fastest dense implementation, the byte ceiling, how much of it the sparse kernel reaches over the best
    dense one, and the share of stock PyTorch's token time spent outside the linears and lm_head (the framework:
    attention, norms, Python), which sparsity cannot shrink."""
    rows = []
    for model, g in df.groupby("model", sort=False):
        g = g.set_index("impl")
        sparse = g[g.index.str.startswith("sparse_")]
        dense = g[~g.index.str.startswith("sparse_")]
        if sparse.empty or "torch_bf16" not in g.index:
            raise ValueError(f"{model}: the table needs torch_bf16 and at least one sparse_* row")
        best_sparse, best_dense = sparse.token_ms.idxmin(), dense.token_ms.idxmin()
        vs_dense = dense.token_ms.min() / sparse.token_ms.min()
        torch_row = g.loc["torch_bf16"]
        rows.append({"model": model, "best_sparse": best_sparse, "best_dense": best_dense,
                     "sparse_ms": sparse.token_ms.min(), "vs_torch": torch_row.token_ms / sparse.token_ms.min(),
                     "vs_best_dense": vs_dense, "ceiling": float(sparse.loc[best_sparse, "ceiling"]),
                     "of_ceiling_vs_best_dense": vs_dense / float(sparse.loc[best_sparse, "ceiling"]),
                     "framework_share": torch_row.framework_ms / torch_row.token_ms})
    return pd.DataFrame(rows)


def call_overhead(kernels: list[str], repeats: int = 2000) -> pd.DataFrame:
    """Fixed cost per linear call: a one-strip layer (16 x 32, cache-resident) at batch 1, timed through
    part 1's Python function (``sparse_linear``: re-checks the weight, pybind), the module (``SparseLinear``:
    the torch.library op) and the bare op, minus the kernel alone timed in a C++ loop."""
    from ._build import load_extension
    from .bench import interleaved_times
    from .format import pack_bf16
    from .ops import KERNEL_CODES, sparse_ops
    from .sparse_linear import sparse_linear

    rows = []
    w = torch.randn(16, 32)
    p = pack_bf16(w)
    x = torch.randn(1, 32).bfloat16()
    ops = sparse_ops()
    for k in kernels:
        code = KERNEL_CODES[k]
        layer = SparseLinear(p, None, k)
        out = torch.empty(1, 16, dtype=torch.bfloat16)
        times = interleaved_times({
            "python_function_part1": lambda: sparse_linear(x, p, kernel=k, out=out),
            "module_op": lambda: layer(x),
            "bare_op": lambda: ops.spmm_bf16(x, p.bitmaps, p.values, p.strip_offsets, 16, None, code),
            "torch_f_linear": lambda: F.linear(x, w.bfloat16()),
        }, repeats, warmup=50)
        err, kernel_s = load_extension().spmm_bf16_timed(x, p.bitmaps, p.values, p.strip_offsets, 16, code,
                                                         repeats, False)
        if err:
            raise RuntimeError(err)
        for path, ts in times.items():
            med = statistics.median(ts)
            rows.append({"kernel": k, "path": path, "call_us": med * 1e6, "call_p10_us": _percentile(ts, 0.1) * 1e6,
                         "kernel_alone_us": kernel_s * 1e6,
                         "fixed_cost_us": (med - (kernel_s if path != "torch_f_linear" else 0)) * 1e6,
                         "threads": torch.get_num_threads()})
    return pd.DataFrame(rows)
