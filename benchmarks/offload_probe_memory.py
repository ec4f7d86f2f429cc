"""Memory and time of one SplitReason probe vs the context length: the history copied per row (naive) vs shared
by reference as one token tree (``effllm_lib.offload.prefix_probe``).

    python benchmarks/offload_probe_memory.py --scale ci                                   # tiny, seconds
    python benchmarks/offload_probe_memory.py --arch smollm2-135m --contexts 1024,2048,4096 --suffix _cpu
    python benchmarks/offload_probe_memory.py --device cuda --dtype bfloat16 --arch qwen2.5-1.5b \\
        --contexts 1024,2048,4096,8192,16384 --suffix _h200

One probe is what the controller does after each big-model chunk: ``--rows`` prefixes of the chunk (1..R tokens,
nested, as a chunk's prefixes are), each with a ``--probe-tokens`` greedy lookahead, then adopting the longest row.
The model is a random-weight model of the named architecture (``--arch``: the published shapes of SmolLM2-135M and
of Qwen2.5-1.5B, the paper's small-model size); the history's KV cache is filled with random values. Memory and
time do not depend on the values, so no weights or text are needed; the two paths are still checked to write the
same lookahead tokens (``same_probes``).

Per (path, context): the median probe time over ``--repeats`` (min and max as spread), the peak memory the probe
adds (CUDA: ``max_memory_allocated`` over what was allocated before; CPU: the rise of the process's peak resident
set, reset before each probe through /proc/self/clear_refs), the history's KV bytes, and the physical limit: the
bytes a probe must read at least (the weights and the history's KV once per forward: the tree plus the lookahead
steps) over the copy bandwidth measured in the same run. The naive path is skipped (row says so) when its R copies
of the history would not fit ``--max-copy-gb``. Writes ``data/results/splitreason/probe_memory<suffix>.csv``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from effllm_lib import results  # noqa: E402
from effllm_lib.offload.controller import Controller, ModelStats, Session  # noqa: E402
from effllm_lib.offload.prefix_probe import IdTokenizer, cache_length, crop_  # noqa: E402

# Published shapes (config.json of HuggingFaceTB/SmolLM2-135M-Instruct and Qwen/Qwen2.5-1.5B-Instruct); "tiny" for CI.
ARCHS = {
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                                   tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, rope_theta=1000000.0,
                                   tie_word_embeddings=True)),
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(arch: str, dtype: torch.dtype, device: str, max_context: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    family, shape = ARCHS[arch]
    cfg = (LlamaConfig if family == "llama" else Qwen2Config)(max_position_embeddings=max_context + 1024, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def random_cache(model, context: int, device: str, dtype: torch.dtype):
    from transformers import DynamicCache

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator(device=device).manual_seed(context)
    cache = DynamicCache()
    for layer in range(cfg.num_hidden_layers):
        shape = (1, cfg.num_key_value_heads, context, head_dim)
        k = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        v = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        cache.update(k, v, layer)
    return cache, 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * context * dtype.itemsize


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakMemory:
    """Bytes a block adds at its peak: CUDA allocator statistics, or the peak resident set on Linux."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        if not self.cuda and not Path("/proc/self/clear_refs").exists():
            raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs (run with --device cuda)")

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = max(0, _rss_kb("VmHWM") * 1024 - self.base)
        return False


def copy_bandwidth(device: str, n_bytes: int) -> float:
    """Bytes/s of a tensor copy (read + write counted as 2 x bytes), median of 5."""
    x = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    times = []
    for _ in range(6):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y.copy_(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    del x, y
    return 2 * n_bytes / statistics.median(times[1:])


def one_probe(ctl: Controller, sess: Session, rows, how: str, device: str):
    """One probe + adopting the longest row; returns (seconds, probe tokens); the session's cache is put back."""
    past = cache_length(sess.cache)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn = ctl._probe_shared if how == "shared" else ctl._probe_batched
    probes, _, row_cache = fn(sess, rows)
    adopted = row_cache(len(rows) - 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if how == "shared":  # adopting appended to the session's own cache: take it back out
        crop_(sess.cache, cache_length(sess.cache) - past)
    del adopted
    return dt, probes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
    ap.add_argument("--contexts", default="1024,2048,4096,8192,16384", help="history lengths, comma-separated")
    ap.add_argument("--rows", type=int, default=64, help="prefixes probed (the chunk length, 64 in the paper)")
    ap.add_argument("--probe-tokens", type=int, default=8, help="lookahead per row (8 in the paper)")
    ap.add_argument("--paths", default="shared,copy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed probes first (allocator, kernels)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-copy-gb", type=float, default=None,
                    help="skip the naive path when R x history KV exceeds this (default: 70%% of free memory)")
    ap.add_argument("--scale", default="full", choices=["ci", "full"])
    ap.add_argument("--suffix", default="", help="appended to the results name (e.g. _h200, _cpu)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.scale == "ci":
        args.arch, args.contexts, args.rows, args.repeats = "tiny", "256,512", 16, 2
    contexts = [int(x) for x in args.contexts.split(",") if x.strip()]
    paths = [p for p in args.paths.split(",") if p]
    if not contexts or min(contexts) < 1 or args.rows < 1 or args.probe_tokens < 1 or args.repeats < 1:
        raise ValueError("contexts, --rows, --probe-tokens and --repeats must be positive")
    if not paths or set(paths) - {"shared", "copy"}:
        raise ValueError(f"--paths is a comma list of shared,copy; got {args.paths!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    if args.max_copy_gb is None:
        if args.device.startswith("cuda"):
            free = torch.cuda.mem_get_info()[0]
        else:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        args.max_copy_gb = 0.7 * free / 1e9
    model = build_model(args.arch, dtype, args.device, max(contexts))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(args.device, 1 << (30 if args.device.startswith("cuda") else 28))
    log(f"{args.arch} ({weight_bytes / 1e6:.0f} MB {dtype}) on {args.device}; copy bandwidth {bw / 1e9:.1f} GB/s")
    tok = IdTokenizer()
    vocab = model.config.vocab_size
    chunk = torch.randint(0, vocab, (args.rows,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [chunk[:r] for r in range(1, args.rows + 1)]
    out = []
    for ctx in contexts:
        probes_by_path = {}
        for how in paths:
            cache, kv_bytes = random_cache(model, ctx, args.device, dtype)
            sess = Session("small", model, tok, ModelStats())
            sess.cache = cache
            sess.ids = [0] * ctx
            with torch.inference_mode():  # logits after the history: one more token on the cache, cropped again
                sess.next_logits = model(input_ids=torch.tensor([[1]], device=args.device),
                                         position_ids=torch.tensor([[ctx]], device=args.device),
                                         past_key_values=cache, use_cache=True).logits[0, -1].float()
            crop_(cache, 1)
            ctl = Controller((model, tok), (model, tok), probe_tokens=args.probe_tokens, probe_kv=how)
            row = {"arch": args.arch, "path": how, "context": ctx, "rows": args.rows,
                   "probe_tokens": args.probe_tokens, "history_kv_mb": kv_bytes / 1e6}
            need = args.rows * kv_bytes if how == "copy" else 0
            if need > args.max_copy_gb * 1e9:
                row["status"] = f"skipped: {args.rows} copies need {need / 1e9:.1f} GB > --max-copy-gb"
                out.append(row)
                log(f"{how:6s} ctx {ctx:6d}: {row['status']}")
                del sess, cache
                continue
            times, peaks = [], []
            try:
                for _ in range(args.warmup):
                    one_probe(ctl, sess, rows, how, args.device)
                for _ in range(args.repeats):
                    with PeakMemory(args.device) as mem:
                        dt, probes = one_probe(ctl, sess, rows, how, args.device)
                    times.append(dt)
                    peaks.append(mem.peak)
                row["status"] = "ok"
                probes_by_path[how] = probes
            except torch.cuda.OutOfMemoryError as exc:
                row["status"] = f"out of memory: {str(exc).splitlines()[0][:120]}"
            if times:
                forwards = args.probe_tokens  # the tree, then probe_tokens - 1 lookahead steps
                limit = forwards * (weight_bytes + kv_bytes) / (bw / 2)
                row.update(time_s=statistics.median(times), time_min_s=min(times), time_max_s=max(times),
                           peak_added_mb=max(peaks) / 1e6, peak_over_history_kv=max(peaks) / kv_bytes,
                           limit_s=limit, time_over_limit=statistics.median(times) / limit)
            out.append(row)
            log(f"{how:6s} ctx {ctx:6d}: {row.get('time_s', float('nan')) * 1e3:8.1f} ms, "
                f"+{row.get('peak_added_mb', float('nan')):9.1f} MB (history KV {kv_bytes / 1e6:.1f} MB) "
                f"{row['status']}")
            del sess, cache, ctl
            gc.collect()
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        if len(probes_by_path) == 2:
            same = probes_by_path["shared"] == probes_by_path["copy"]
            for r in out[-2:]:
                r["same_probes"] = same
    df = pd.DataFrame(out)
    # ratios against the naive path measured in the same run, at the same context
    for ctx in contexts:
        base = df[(df.context == ctx) & (df.path == "copy") & (df.status == "ok")]
        if len(base) and "time_s" in df:
            sel = df.context == ctx
            df.loc[sel, "speedup_vs_copy"] = float(base.time_s.iloc[0]) / df.loc[sel, "time_s"]
            df.loc[sel, "memory_saving_vs_copy"] = float(base.peak_added_mb.iloc[0]) / df.loc[sel, "peak_added_mb"]
    print(df.round(4).to_string(index=False), flush=True)
    if not args.no_save:
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
        path = results.save(df, "splitreason", f"probe_memory{args.suffix}", params=vars(args), scale=args.scale,
                            extra={"device": dev, "copy_bandwidth_gbs": bw / 1e9, "weights_mb": weight_bytes / 1e6,
                                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                                   "weights": "random, the published shape of --arch; KV cache random"})
        log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
