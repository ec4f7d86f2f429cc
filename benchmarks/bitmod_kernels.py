"""Benchmark the packed BitMoD kernels on the Llama-3-8B linear shapes and write the results.

    python benchmarks/bitmod_kernels.py --scale ci                     # small shapes, a smoke test (~1 min)
    python benchmarks/bitmod_kernels.py --tag _xeon_h200               # full run: CPU part, and GPU if CUDA
    python benchmarks/bitmod_kernels.py --parts gpu --tag _h200         # only one part

Shapes (out x in): 4096 x 14336 (down_proj) and 14336 x 4096 (gate/up_proj), group 128, 3 and 4 bits, bf16
activations. The packed weights are random codes, type ids and FP16 scales: every bit pattern is a valid
BitMoD weight and the kernels have no data-dependent branches, so their speed does not depend on the values
(the kernels' correctness is tested separately against quantize_'s weights, tests/test_bitmod_kernels.py;
a spot check here compares each kernel with the dequantized weight once).

Parts (--parts, default cpu,gpu; gpu is skipped without CUDA), each writing data/results/bitmod/<name><tag>.csv
(scale full; --scale ci writes to data/results/bitmod/ci/):
  cpu  kernels_cpu   per shape x bits x tokens (1, 4, 8): torch bf16 F.linear, every BitMoD SIMD kernel
       this CPU runs (``bitmod_<isa>``: the user-facing call, ``bitmod_<isa>_raw``: the kernel on pre-laid-out
       input, ``bitmod_<isa>_single_type``: every group of one type, which prices the per-group data-type
       mix), same threads; the bytes each reads over the read bandwidth measured in this run (SparAMX's
       stream_read probe) = bound_us; speedup_vs_bf16 and frac_of_bound. ``torch_int4``: torch's own 4-bit
       weight-only GEMM for CPU (aten._weight_int4pack_mm_for_cpu, group 128, bf16 scale+zero per group), the
       4-bit baseline at about the same bits per weight. (llama.cpp's Q4_0 / IQ4_NL kernels are not compared:
       no prebuilt Python wheel offers them, llama-cpp-python compiles from source, and the device has no
       internet.)
  gpu  kernels_gpu   per shape x bits x tokens (1, 4, 16, 64): torch bf16, the BitMoD Triton kernel (the
       user-facing call: autotuned in this run on first use, ``config`` column = the winner), torch's int4
       weight-only GEMM (aten._weight_int4pack_mm, the tinygemm kernel gpt-fast uses; group 128) and torchao
       int4 if it imports; CUDA graphs over weight copies that exceed the L2 cache, so neither launch
       overhead nor L2 hides the kernel; the bound is bytes over the HBM read bandwidth measured in this run
       (torch.sum over a 4 GiB buffer). For the Triton kernel also the issue bound: SASS instructions of the
       chosen config (the kernel has no loop, so every thread runs each once) x threads x programs over the
       SMs' issue rate (4 warp-instructions per SM per cycle at the max SM clock): ``sass_per_weight`` and
       ``issue_bound_us`` say whether instructions, not bytes, bound it.
Timings are medians over interleaved repeats (p10/p90 columns give the spread).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time

import pandas as pd
import torch
import torch.nn.functional as F

from effllm_lib import results
from effllm_lib.bitmod.packed import PackedBitMoD, dequantize, group_bytes

SHAPES_FULL = {"down_proj": (4096, 14336), "gate_up_proj": (14336, 4096)}
SHAPES_CI = {"small_wide": (512, 1024), "small_tall": (1024, 512)}
GROUP = 128


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def random_packed(out_features: int, in_features: int, bits: int, device="cpu", seed: int = 0) -> PackedBitMoD:
    g = torch.Generator().manual_seed(seed)
    n_groups = -(-in_features // GROUP)
    codes = torch.randint(0, 256, (out_features, n_groups * group_bytes(bits, GROUP)), generator=g,
                          dtype=torch.uint8)
    scales = (torch.rand(out_features, n_groups, generator=g) * 2e-3 + 5e-4).half()
    types = torch.randint(0, 256, (out_features, -(-n_groups // 4)), generator=g, dtype=torch.uint8)
    return PackedBitMoD(codes.to(device), scales.to(device), types.to(device), in_features, bits, GROUP,
                        torch.bfloat16)


def single_type(p: PackedBitMoD) -> PackedBitMoD:
    """The same codes and scales with every group of type 0: what the per-group type mix costs is the time
    difference (the kernels are otherwise identical)."""
    return PackedBitMoD(p.codes, p.scales, torch.zeros_like(p.type_ids), p.in_features, p.bits, p.group_size,
                        p.dtype)


def packed_nbytes(out_features: int, in_features: int, bits: int) -> int:
    """Bytes of a packed weight with FP16 scales (codes + scales + 2-bit type ids)."""
    n_groups = -(-in_features // GROUP)
    return out_features * (n_groups * (group_bytes(bits, GROUP) + 2) + -(-n_groups // 4))


def spread(ts: list[float]) -> dict:
    s = sorted(ts)
    return {"median_us": 1e6 * statistics.median(s), "p10_us": 1e6 * s[len(s) // 10],
            "p90_us": 1e6 * s[min(len(s) - 1, (9 * len(s)) // 10)], "repeats": len(s)}


# ------------------------------------------------------------------------------------------ int4 baselines
def int4_nbytes(n: int, k: int) -> int:
    """torch's int4 weight-only format: 4-bit codes + a bf16 scale and a bf16 zero per group and row."""
    return n * k // 2 + 2 * 2 * n * (k // GROUP)


def _int4_codes(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.int32)
    scale = torch.rand(k // GROUP, n, generator=g) * 2e-3 + 5e-4
    return q, torch.stack([scale, torch.zeros_like(scale)], -1).bfloat16()   # [k/g, n, (scale, zero)]


def _int4_reference(x, q, sz):
    """tinygemm's dequantization: (q - 8) x scale + zero, on x's device."""
    q, sz = q.to(x.device), sz.to(x.device)
    scale = sz[..., 0].float().T.repeat_interleave(GROUP, 1)
    zero = sz[..., 1].float().T.repeat_interleave(GROUP, 1)
    return x.float() @ ((q.float() - 8) * scale + zero).T


def cpu_int4_weight(n, k, seed=0):
    """(packed weight, group size, scales+zeros) for aten._weight_int4pack_mm_for_cpu; checked once."""
    q, sz = _int4_codes(n, k, seed)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    if seed == 0:
        x = torch.randn(2, k).bfloat16()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, sz).float()
        ref = _int4_reference(x, q, sz)
        if float((y - ref).abs().max() / ref.abs().max()) > 2e-2:
            raise RuntimeError("torch int4 CPU baseline disagrees with its own dequantization")
    return packed, GROUP, sz


def gpu_int4_weight(n, k, seed=0):
    """(packed weight, group size, scales+zeros) for aten._weight_int4pack_mm (CUDA, inner k tiles 8)."""
    q, sz = _int4_codes(n, k, seed)
    q8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8).cuda()
    packed = torch.ops.aten._convert_weight_to_int4pack(q8, 8)
    sz = sz.cuda()
    check = None
    if seed == 0:
        x = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(x, packed, GROUP, sz).float()
        ref = _int4_reference(x, q, sz)
        check = float((y - ref).abs().max() / ref.abs().max())
    return (packed, GROUP, sz), check


# -------------------------------------------------------------------------------------------------- CPU
def cpu_part(shapes, bits_list, tokens_list, repeats, full) -> tuple[pd.DataFrame, dict]:
    from effllm_lib.bitmod import cpu_gemv
    from effllm_lib.sparse.bench import interleaved_times, last_level_cache_bytes, measure_read_bandwidth

    kernels = [k for k in cpu_gemv.available_kernels() if k != "portable"] or ["portable"]
    llc = last_level_cache_bytes()
    probe = measure_read_bandwidth(None if full else 64 * 2**20, repeats=9 if full else 3)
    bw = probe["bytes_per_s"]
    log(f"CPU: {torch.get_num_threads()} threads, kernels {kernels}, LLC {llc / 2**20:.0f} MiB, "
        f"read bandwidth {probe['gbs']:.1f} GB/s")
    ext = cpu_gemv.load_extension()
    table = {b: cpu_gemv._lut_table(b) for b in (3, 4)}
    rows = []
    for name, (n, k) in shapes.items():
        dense_bytes = n * k * 2
        n_dense = max(2, math.ceil(3 * llc / dense_bytes))
        dense = [torch.randn(n, k).bfloat16() * 0.02 for _ in range(n_dense)]
        int4 = [cpu_int4_weight(n, k, seed=i) for i in range(max(2, math.ceil(3 * llc / (n * k // 2))))]
        for bits in bits_list:
            packed_bytes = packed_nbytes(n, k, bits)
            copies = [random_packed(n, k, bits, seed=i) for i in range(max(2, math.ceil(3 * llc / packed_bytes)))]
            single = [single_type(p) for p in copies]
            # spot check: each kernel against the dequantized weight on one copy
            x = torch.randn(2, k).bfloat16()
            ref = x.float() @ dequantize(copies[0]).float().T
            for kern in kernels:
                y = cpu_gemv.bitmod_linear_cpu(x, copies[0], kernel=kern).float()
                err = float((y - ref).abs().max() / ref.abs().max())
                if err > 1e-2:
                    raise RuntimeError(f"{kern} kernel disagrees with the dequantized weight: rel err {err}")
            for tokens in tokens_list:
                x = torch.randn(tokens, k).bfloat16()
                xg = cpu_gemv.grouped_input(x, k, GROUP, copies[0].n_groups)
                out = torch.empty(tokens, n)
                it = {"d": 0, "p": 0, "s": 0, "i": 0}

                def nxt(key, seq):
                    it[key] = (it[key] + 1) % len(seq)
                    return seq[it[key]]

                cands = {"torch_bf16": lambda: F.linear(x, nxt("d", dense)),
                         "torch_int4": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, *nxt("i", int4))}
                for kern in kernels:
                    cands[f"bitmod_{kern}"] = lambda kern=kern: cpu_gemv.bitmod_linear_cpu(x, nxt("p", copies),
                                                                                           kernel=kern)

                    def raw(kern=kern):
                        p = nxt("p", copies)
                        err = ext.gemv(xg, p.codes, p.scales, p.type_ids, table[bits], bits, GROUP, 1, None, out,
                                       kern)
                        if err:
                            raise RuntimeError(err)
                    cands[f"bitmod_{kern}_raw"] = raw
                    cands[f"bitmod_{kern}_single_type"] = lambda kern=kern: cpu_gemv.bitmod_linear_cpu(
                        x, nxt("s", single), kernel=kern)
                times = interleaved_times(cands, repeats)
                base = statistics.median(times["torch_bf16"])
                for impl, ts in times.items():
                    nbytes = {"torch_bf16": dense_bytes, "torch_int4": int4_nbytes(n, k)}.get(impl, packed_bytes)
                    s = spread(ts)
                    rows.append({"shape": name, "out_features": n, "in_features": k, "bits": bits,
                                 "tokens": tokens, "impl": impl, **s, "weight_bytes": nbytes,
                                 "bits_per_weight": 8 * nbytes / (n * k), "bound_us": 1e6 * nbytes / bw,
                                 "frac_of_bound": (1e6 * nbytes / bw) / s["median_us"],
                                 "speedup_vs_bf16": base / statistics.median(ts),
                                 "achieved_gbs": nbytes / statistics.median(ts) / 1e9})
                log(f"{name} {bits}-bit {tokens} tok: " + ", ".join(
                    f"{r['impl']} {r['median_us']:.0f} us ({r['speedup_vs_bf16']:.2f}x, {r['frac_of_bound']:.0%} "
                    f"of bound)" for r in rows[-len(times):]))
    params = {"threads": torch.get_num_threads(), "kernels": kernels, "repeats": repeats, "group_size": GROUP,
              "read_bandwidth_gbs": round(probe["gbs"], 2), "bandwidth_method": probe["method"],
              "weights": "random packed codes / types / FP16 scales (speed is value-independent)",
              "cache": f"weight copies cycled to exceed 3x the {llc / 2**20:.0f} MiB LLC",
              "torch_int4": "aten._weight_int4pack_mm_for_cpu, group 128, inner k tiles 2, bf16 scale+zero",
              "llama_cpp": "not compared: no prebuilt wheel with its Q4_0 / IQ4_NL kernels (llama-cpp-python builds "
                           "from source) and no internet on the device"}
    return pd.DataFrame(rows), params


# -------------------------------------------------------------------------------------------------- GPU
def hbm_read_bandwidth(repeats: int = 20) -> float:
    buf = torch.ones(2**30, dtype=torch.float32, device="cuda")  # 4 GiB
    buf.sum()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        buf.sum()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del buf
    return 2**32 / statistics.median(times)


def graph_timer(fns: list, replays: int):
    """A CUDA graph running every fn once (one per weight copy); returns a callable giving seconds per fn."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()

    def run():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(replays):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        return a.elapsed_time(b) / 1e3 / replays / len(fns)
    return run


def torchao_int4(n, k, copies):
    """torchao int4 weight-only linears (group 128) or (None, reason)."""
    try:
        import torchao
        from torchao.quantization import quantize_ as ao_quantize_
        try:
            from torchao.quantization import Int4WeightOnlyConfig
            cfg = Int4WeightOnlyConfig(group_size=GROUP)
        except ImportError:
            from torchao.quantization import int4_weight_only
            cfg = int4_weight_only(group_size=GROUP)
        layers = []
        for _ in range(copies):
            lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device="cuda")
            ao_quantize_(lin, cfg)
            layers.append(lin)
        return layers, f"torchao {torchao.__version__} {type(cfg).__name__}"
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here", recorded in params
        return None, f"torchao int4 unavailable: {type(exc).__name__}: {exc}"[:300]


def sm_clock_hz() -> tuple[float, str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return float(out[0]) * 1e6, "nvidia-smi clocks.max.sm"
    except Exception:  # noqa: BLE001
        return 1.98e9, "assumed 1980 MHz (H200 max SM clock; nvidia-smi unavailable)"


def gpu_part(shapes, bits_list, tokens_list, repeats) -> tuple[pd.DataFrame, dict]:
    from effllm_lib.bitmod import triton_gemv

    bw = hbm_read_bandwidth()
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 64 * 2**20)
    sms = props.multi_processor_count
    clock, clock_source = sm_clock_hz()
    issue_rate = sms * 4 * 32 * clock   # thread-instructions per second: 4 schedulers x 1 warp-instruction / cycle
    log(f"GPU {torch.cuda.get_device_name(0)}: HBM read {bw / 1e9:.0f} GB/s, L2 {l2 / 2**20:.0f} MiB, {sms} SMs, "
        f"{clock / 1e6:.0f} MHz ({clock_source})")
    rows, notes = [], {}
    for name, (n, k) in shapes.items():
        dense_bytes = n * k * 2
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(max(2, math.ceil(4 * l2 / dense_bytes)))]
        int4 = []
        try:
            for i in range(max(2, math.ceil(4 * l2 / int4_nbytes(n, k)))):
                w, check = gpu_int4_weight(n, k, seed=i)
                int4.append(w)
                if check is not None:
                    notes[f"torch_int4_{name}_rel_err_vs_dequantized"] = round(check, 5)
        except Exception as exc:  # noqa: BLE001 - recorded, the rest of the run goes on
            int4, notes[f"torch_int4_{name}"] = [], f"unavailable: {type(exc).__name__}: {exc}"[:300]
        ao_layers, notes[f"torchao_{name}"] = torchao_int4(n, k, max(2, math.ceil(4 * l2 / (n * k // 2))))
        for bits in bits_list:
            packed_bytes = packed_nbytes(n, k, bits)
            copies = [random_packed(n, k, bits, "cuda", seed=i)
                      for i in range(max(2, math.ceil(4 * l2 / packed_bytes)))]
            assert copies[0].nbytes() == packed_bytes
            single = [single_type(p) for p in copies]
            for tokens in tokens_list:
                x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
                # spot check (and the autotuning of this token bucket, timed runs excluded from the graphs)
                t0 = time.perf_counter()
                y = triton_gemv.bitmod_linear_triton(x, copies[0]).float()
                torch.cuda.synchronize()
                tune_s = time.perf_counter() - t0
                ref = x.float() @ dequantize(copies[0]).float().T
                err = float((y - ref).abs().max() / ref.abs().max())
                if err > 1e-2:
                    raise RuntimeError(f"the Triton kernel disagrees with the dequantized weight: rel err {err}")
                best = (triton_gemv.tuned_config(tokens, n, k, bits, GROUP, torch.bfloat16)
                        or triton_gemv.last_config())   # the call above was the last autotuned one
                timers = {"torch_bf16": graph_timer([lambda w=w: F.linear(x, w) for w in dense], 5),
                          "bitmod_triton": graph_timer([lambda p=p: triton_gemv.bitmod_linear_triton(x, p)
                                                        for p in copies], 5),
                          "bitmod_triton_single_type": graph_timer(
                              [lambda p=p: triton_gemv.bitmod_linear_triton(x, p) for p in single], 5)}
                if int4:
                    try:
                        timers["torch_int4"] = graph_timer(
                            [lambda w=w: torch.ops.aten._weight_int4pack_mm(x, *w) for w in int4], 5)
                    except Exception as exc:  # noqa: BLE001
                        notes[f"torch_int4_{name}_{tokens}"] = f"failed: {type(exc).__name__}: {exc}"[:200]
                if ao_layers:
                    try:
                        timers["torchao_int4"] = graph_timer([lambda m=m: m(x) for m in ao_layers], 5)
                    except Exception as exc:  # noqa: BLE001 - recorded, the rest of the run goes on
                        notes[f"torchao_{name}"] += f"; graph capture failed: {type(exc).__name__}: {exc}"[:200]
                try:  # what bounds the kernel besides bytes: its instructions at the SMs' issue rate
                    inst = triton_gemv.instruction_count(x, copies[0], best)
                except Exception as exc:  # noqa: BLE001
                    inst = None
                    notes[f"instructions_{name}_{bits}_{tokens}"] = f"failed: {type(exc).__name__}: {exc}"[:200]
                times = {key: [] for key in timers}
                for rep in range(repeats):
                    order = list(timers)[rep % len(timers):] + list(timers)[:rep % len(timers)]
                    for key in order:
                        times[key].append(timers[key]())
                base = statistics.median(times["torch_bf16"])
                for impl, ts in times.items():
                    nbytes = {"torch_bf16": dense_bytes, "torch_int4": int4_nbytes(n, k),
                              "torchao_int4": int4_nbytes(n, k)}.get(impl, packed_bytes)
                    s = spread(ts)
                    row = {"shape": name, "out_features": n, "in_features": k, "bits": bits, "tokens": tokens,
                           "impl": impl, **s, "weight_bytes": nbytes, "bits_per_weight": 8 * nbytes / (n * k),
                           "bound_us": 1e6 * nbytes / bw, "frac_of_bound": (1e6 * nbytes / bw) / s["median_us"],
                           "speedup_vs_bf16": base / statistics.median(ts),
                           "achieved_gbs": nbytes / statistics.median(ts) / 1e9, "config": "", "tune_s": None,
                           "instructions": None, "instructions_kind": "", "sass_per_weight": None,
                           "issue_bound_us": None, "registers": None, "spills": None}
                    if impl.startswith("bitmod_triton"):
                        row.update(config=str(best), tune_s=tune_s if impl == "bitmod_triton" else None)
                        if inst:
                            row.update(instructions=inst["per_thread"], instructions_kind=inst["kind"],
                                       sass_per_weight=inst["thread_instructions"] / (n * k),
                                       issue_bound_us=1e6 * inst["thread_instructions"] / issue_rate,
                                       registers=inst["registers"], spills=inst["spills"])
                    rows.append(row)
                log(f"{name} {bits}-bit {tokens} tok: " + ", ".join(
                    f"{r['impl']} {r['median_us']:.1f} us ({r['speedup_vs_bf16']:.2f}x, {r['frac_of_bound']:.0%})"
                    for r in rows[-len(times):]) + f"; triton {best}, issue bound "
                    + (f"{1e6 * inst['thread_instructions'] / issue_rate:.1f} us "
                       f"({inst['thread_instructions'] / (n * k):.2f} {inst['kind']}/weight, {inst['registers']} regs)"
                       if inst else "n/a"))
        del dense, ao_layers, int4
        torch.cuda.empty_cache()
    params = {"gpu": torch.cuda.get_device_name(0), "repeats": repeats, "group_size": GROUP,
              "hbm_read_gbs": round(bw / 1e9, 1), "bandwidth_method": "torch.sum over a 4 GiB float32 buffer, "
              "median of 20 (CUDA events)", "timing": "CUDA graph over weight copies exceeding 4x L2",
              "triton": "autotuned on first use per token bucket (triton.autotune over the configs in "
                        "effllm_lib/bitmod/triton_gemv.py); config = the winner",
              "sms": sms, "sm_clock_mhz": round(clock / 1e6), "sm_clock_source": clock_source,
              "issue_bound": "static instruction count x 32 x num_warps x programs / (SMs x 4 x 32 x clock)",
              "torch_int4": "aten._weight_int4pack_mm (tinygemm), group 128, inner k tiles 8, bf16 scale+zero",
              "int4_bytes": "4-bit codes + bf16 scale and zero per group", **notes}
    return pd.DataFrame(rows), params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("ci", "full"), default="full")
    ap.add_argument("--tag", default="", help="appended to the results names (e.g. _xeon_h200)")
    ap.add_argument("--parts", default="cpu,gpu", help="comma-separated subset of cpu, gpu")
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts or parts - {"cpu", "gpu"}:
        ap.error("--parts takes cpu and/or gpu")
    bits_list = [int(b) for b in args.bits.split(",")]
    if set(bits_list) - {3, 4}:
        ap.error("--bits takes 3 and/or 4")
    full = args.scale == "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES_FULL if full else SHAPES_CI
    repeats = args.repeats or (21 if full else 5)
    extra = {"load_average": os.getloadavg()}
    saved = []
    if "cpu" in parts:
        df, params = cpu_part(shapes, bits_list, (1, 4, 8), repeats, full)
        saved.append(results.save(df, "bitmod", f"kernels_cpu{args.tag}", params=params, scale=args.scale,
                                  extra=extra))
    if "gpu" in parts:
        if not torch.cuda.is_available():
            log("gpu part skipped: no CUDA device")
        else:
            df, params = gpu_part(shapes, bits_list, (1, 4, 16, 64), repeats)
            saved.append(results.save(df, "bitmod", f"kernels_gpu{args.tag}", params=params, scale=args.scale,
                                      extra=extra))
    log(f"saved {[str(p) for p in saved]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
