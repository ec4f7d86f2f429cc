"""Benchmark the SparAMX sparse kernels on the Llama-3-8B layer shapes and write the results.

    python benchmarks/sparse_kernels.py                      # full run on this machine (AVX-512 claims)
    python benchmarks/sparse_kernels.py --scale ci           # small shapes, prints only (a smoke test)
    python benchmarks/sparse_kernels.py --suffix _xeon --claims amx   # on an AMX Xeon (the device machine)
    python benchmarks/sparse_kernels.py --parts threads,batch         # only some parts

Parts (--parts, comma-separated, default all) and what each writes (full scale) in data/results/sparamx/:
  layers   layer_latency<suffix>   batch-1 latency per layer shape x sparsity x implementation, with the bound
           kernels_scorecard<suffix>  claim_id, ours for the kernel-level claims of data/paper/sparamx.csv
  limits   limits<suffix>          what bounds each kernel: DRAM bandwidth vs the measured tile-row decode rate
           (needs layers)
  batch    batch_sweep<suffix>     latency vs tokens (1..128), 4096 x 4096 at 50 %, AMX vs AVX-512 per batch
  threads  thread_scaling<suffix>  1, 2, 4, 8, 16 threads (capped at the cores), 4096 x 4096 and 14336 x 4096
           at 50 %, batch 1, with the read bandwidth re-measured on each thread count
  bandwidth  bandwidth<suffix>     the read-bandwidth probe (always run; its method is in every file's params)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import pandas as pd
import torch

from effllm_lib import results
from effllm_lib.sparse import available_kernels, compression_ratio
from effllm_lib.sparse.bench import (LLAMA3_8B_SHAPES, decode_rate_ns_per_row, decoder_layer_summary,
                                     last_level_cache_bytes, layer_latency, measure_read_bandwidth,
                                     thread_scaling)

SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.9)
BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)
THREADS = (1, 2, 4, 8, 16)
PARTS = ("layers", "limits", "batch", "threads")
CI_SHAPES = {"small_sq": (512, 512, 1), "small_wide": (1024, 512, 1)}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("ci", "full"), default="full")
    ap.add_argument("--suffix", default="", help="appended to every results name (e.g. _xeon)")
    ap.add_argument("--claims", choices=("avx512", "amx", "none"), default="avx512",
                    help="which kernel-level claims this run measures")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    ap.add_argument("--decode-rate", choices=("cpp", "python"), default="cpp",
                    help="limits: time the one-thread decode rate in a C++ loop inside the extension (default) "
                         "or through the Python call (part 1's way, includes the call's fixed cost)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if "limits" in parts and "layers" not in parts:
        ap.error("--parts limits needs layers (it compares against the measured layer latencies)")
    full = args.scale == "full"
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = [k for k in available_kernels("bf16") if k != "portable"] or ["portable"]
    has_amx = "amx" in kernels
    if args.claims == "amx" and not has_amx:
        print("--claims amx needs a CPU with AMX; this one has kernels " + str(available_kernels("bf16")),
              file=sys.stderr)
        return 2
    repeats = args.repeats or (21 if full else 5)
    shapes = LLAMA3_8B_SHAPES if full else CI_SHAPES
    llc = last_level_cache_bytes()
    stream = 3 * llc if full else 16 * 2**20
    log(f"threads {torch.get_num_threads()}, kernels {kernels}, LLC {llc / 2**20:.0f} MiB, streaming "
        f"{stream / 2**20:.0f} MiB of weight copies")
    probe = measure_read_bandwidth(None if full else 64 * 2**20, repeats=9 if full else 3)
    bw = probe["bytes_per_s"]
    log(f"read bandwidth {probe['gbs']:.1f} GB/s ({probe['method']})")
    params = {"threads": torch.get_num_threads(), "kernels": kernels, "repeats": repeats,
              "stream_bytes": stream, "read_bandwidth_gbs": round(probe["gbs"], 2),
              "bandwidth_method": probe["method"], "bandwidth_rates_gbs": probe["rates_gbs"],
              "decode_rate_timing": args.decode_rate}
    extra = {"load_average": os.getloadavg()}
    sfx = args.suffix
    saved = []

    def save(df, name, **more):
        if full:
            saved.append(results.save(df, "sparamx", f"{name}{sfx}", params={**params, **more}, scale="full",
                                      extra=extra))

    save(pd.DataFrame([{**{k: v for k, v in probe.items() if k not in ("bytes_per_s", "rates_gbs")},
                        **{f"{k}_gbs": v for k, v in probe["rates_gbs"].items()}}]), "bandwidth")

    if "threads" in parts:
        scale_shapes = ({"q_proj/o_proj": (4096, 4096, 2), "gate_proj/up_proj": (14336, 4096, 2)} if full
                        else CI_SHAPES)
        scaling = thread_scaling(scale_shapes, 0.5, kernels, THREADS, tokens=1, repeats=max(5, repeats // 2),
                                 stream_bytes=stream, dense_amx=has_amx, progress=log,
                                 bandwidth_bytes=None if full else 64 * 2**20)
        log("thread scaling:\n" + scaling.pivot_table(index=["layer", "threads"], columns="impl",
                                                      values="latency_us").round(0).to_string())
        save(scaling, "thread_scaling", thread_counts=list(THREADS), sparsity=0.5)

    if "batch" in parts:
        sweep_shape = {"q_proj/o_proj": (4096, 4096, 1)} if full else {"small_sq": (512, 512, 1)}
        sweep = pd.concat([layer_latency(sweep_shape, (0.5,), kernels, tokens=b, repeats=max(5, repeats // 2),
                                         stream_bytes=stream, bandwidth=bw, dense_amx=has_amx, progress=log)
                           for b in BATCHES], ignore_index=True)
        if "speedup_vs_avx512" in sweep:
            log("batch sweep, time of sparse_avx512 / time of each (AMX vs AVX-512 per batch):\n" +
                sweep.pivot_table(index="tokens", columns="impl", values="speedup_vs_avx512").round(2).to_string())
        save(sweep, "batch_sweep", batches=list(BATCHES))

    if "layers" not in parts:
        log(f"saved {[str(p) for p in saved]}" if full else "scale ci: nothing saved")
        return 0
    lat = layer_latency(shapes, SPARSITIES, kernels, tokens=1, repeats=repeats, stream_bytes=stream, bandwidth=bw,
                        dense_amx=has_amx, progress=log)
    summary = decoder_layer_summary(lat)
    log("decoder-layer totals:\n" + summary.to_string(index=False))
    save(lat, "layer_latency")

    threads = torch.get_num_threads()
    limits = []
    for k in (kernels if "limits" in parts else []):
        for s in SPARSITIES:
            ns = decode_rate_ns_per_row(k, sparsity=s, in_cpp=args.decode_rate == "cpp")
            for layer, (n, kk, _) in shapes.items():
                r = lat[(lat.layer == layer) & (lat.sparsity == s) & (lat.impl == f"sparse_{k}")].iloc[0]
                rows_per_layer = n * kk // 32  # tile rows of 32 weights
                limits.append({"kernel": k, "sparsity": s, "layer": layer, "ns_per_tile_row_1thread": ns,
                               "threads": threads, "decode_1thread_us": rows_per_layer * ns / 1e3,
                               "compute_floor_us": rows_per_layer * ns / threads / 1e3,
                               "bandwidth_bound_us": r.bound_us, "measured_us": r.latency_us,
                               "limited_by": "decode (compute)" if rows_per_layer * ns / threads / 1e3 >
                               r.bound_us else "memory bandwidth"})
    limits = pd.DataFrame(limits)
    if len(limits):
        log("limits:\n" + limits.to_string(index=False))
        save(limits, "limits")

    def total(s, impl, col="total_us"):
        return float(summary[(summary.sparsity == s) & (summary.impl == impl)][col].iloc[0])

    claims = []
    comp = {}
    for s in (0.5, 0.7):
        d = lat[(lat.sparsity == s)]
        dense_b = (d[d.impl == "torch_bf16"].weight_bytes * d[d.impl == "torch_bf16"].count_per_decoder_layer).sum()
        sp = d[d.impl == f"sparse_{kernels[0]}"]
        comp[s] = dense_b / (sp.weight_bytes * sp.count_per_decoder_layer).sum()
    def bound_reason(kernel: str) -> str:
        frac = total(0.5, f"sparse_{kernel}", "bound_fraction")
        if frac >= 0.8 or not len(limits):
            return ""
        lim = limits[(limits.kernel == kernel) & (limits.sparsity == 0.5)]
        d = lat[(lat.sparsity == 0.5) & (lat.impl == f"sparse_{kernel}")]
        return (f"below 0.8: summed over the layer, compute floor {lim.compute_floor_us.mul(d.count_per_decoder_layer.values).sum():.0f} us "
                f"(tile-row decode rate {lim.ns_per_tile_row_1thread.iloc[0]:.2f} ns/row/thread, cache-resident) vs "
                f"bandwidth bound {(d.bound_us * d.count_per_decoder_layer).sum():.0f} us vs measured "
                f"{(d.latency_us * d.count_per_decoder_layer).sum():.0f} us (p10 {(d.latency_p10_us * d.count_per_decoder_layer).sum():.0f} us); "
                f"per-point bandwidth {d.bandwidth_gbs.min():.0f}-{d.bandwidth_gbs.max():.0f} GB/s and load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: the CPU and memory were shared with other jobs")

    if args.claims == "avx512" and "avx512" in kernels:
        claims += [
            {"claim_id": "compression_s50", "ours": comp[0.5], "reason": f"formula gives {compression_ratio(0.5):.3f}"},
            {"claim_id": "compression_s70", "ours": comp[0.7], "reason": f"formula gives {compression_ratio(0.7):.3f}"},
            {"claim_id": "layer_speedup_b1_s50", "ours": total(0.5, "torch_bf16") / total(0.5, "sparse_avx512"),
             "reason": ""},
            {"claim_id": "layer_speedup_b1_s70", "ours": total(0.7, "torch_bf16") / total(0.7, "sparse_avx512"),
             "reason": ""},
            {"claim_id": "layer_bound_fraction_b1_s50", "ours": total(0.5, "sparse_avx512", "bound_fraction"),
             "reason": bound_reason("avx512")},
        ]
    elif args.claims == "amx":
        claims += [
            {"claim_id": "amx_layer_speedup_b1_s50", "ours": total(0.5, "torch_bf16") / total(0.5, "sparse_amx"),
             "reason": ""},
            {"claim_id": "amx_vs_dense_amx_b1_s50", "ours": total(0.5, "dense_amx") / total(0.5, "sparse_amx"),
             "reason": ""},
            {"claim_id": "amx_layer_speedup_b1_s70", "ours": total(0.7, "torch_bf16") / total(0.7, "sparse_amx"),
             "reason": ""},
            {"claim_id": "amx_layer_bound_fraction_b1_s50", "ours": total(0.5, "sparse_amx", "bound_fraction"),
             "reason": (f"bound = compressed bytes / {lat.bound_bandwidth_gbs.iloc[0]:.1f} GB/s "
                        f"({lat.bound_source.iloc[0]}; probes {probe['rates_gbs']})")},
        ]
    for c in claims:
        c["status"] = "measured"
    log("claims: " + str(claims))

    if claims:
        save(pd.DataFrame(claims), "kernels_scorecard")
    log(f"saved {[str(p) for p in saved]}" if full else "scale ci: nothing saved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
