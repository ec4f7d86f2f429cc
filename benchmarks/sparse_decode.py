"""End-to-end decode latency, stock PyTorch bf16 vs the sparse kernels, batch 1 (effllm_lib.sparse.decode_bench).

    python benchmarks/sparse_decode.py --scale ci                       # 2-layer models, prints only
    python benchmarks/sparse_decode.py --models llama3-8b --suffix _xeon --kernels auto,avx512,amx
    python benchmarks/sparse_decode.py --models smollm2-135m,gemma3-270m,qwen2.5-1.5b --suffix _xeon \\
        --kernels auto,avx512,amx --name decode_latency_small

Writes (full scale) data/results/sparamx/<name><suffix> (default name decode_latency: one row per model x
implementation: per-token median and p10/p90, prefill, linears / lm_head / framework split, bytes per token,
ceiling and measured/ceiling), call_overhead<suffix> (fixed cost per linear call, before/after) and, when
llama3-8b at 50 % is measured, e2e_scorecard<suffix> (claim e2e_speedup_vs_pytorch). Threads are pinned
(OMP_PROC_BIND=close, OMP_PLACES=cores, set before torch loads, unless already set).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from effllm_lib import results  # noqa: E402
from effllm_lib.sparse import available_kernels  # noqa: E402
from effllm_lib.sparse.autotune import calibrate  # noqa: E402
from effllm_lib.sparse.decode_bench import MODEL_CONFIGS, call_overhead, decode_latency, e2e_claims  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("ci", "full"), default="full")
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m,qwen2.5-1.5b,llama3-8b")
    ap.add_argument("--kernels", default="auto", help="comma-separated sparse kernels: auto, portable, avx512, amx")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--suffix", default="", help="appended to every results name (e.g. _xeon)")
    ap.add_argument("--name", default="decode_latency")
    ap.add_argument("--no-overhead", action="store_true", help="skip the per-call fixed-cost table")
    ap.add_argument("--no-dense-amx", action="store_true", help="skip the dense AMX baseline (AMX CPUs only)")
    ap.add_argument("--claims-from", metavar="NAME", help="only rewrite e2e_scorecard<suffix> from the committed "
                    "results file data/results/sparamx/NAME (e.g. decode_latency_xeon); measures nothing")
    args = ap.parse_args(argv)
    if args.claims_from:
        card = e2e_claims(results.load("sparamx", args.claims_from))
        path = results.save(card, "sparamx", f"e2e_scorecard{args.suffix}", scale="full",
                            params={"measured_in": args.claims_from, "claims": list(card.claim_id)})
        log(f"{card.to_string()}\nsaved {path}")
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODEL_CONFIGS]
    if bad:
        ap.error(f"--models: unknown {bad}; choose from {', '.join(MODEL_CONFIGS)}")
    here = available_kernels("bf16")
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    missing = [k for k in kernels if k != "auto" and k not in here]
    if missing:
        print(f"--kernels {missing} cannot run here (available: {here})", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    full = args.scale == "full"
    cal = calibrate()
    log(f"threads {torch.get_num_threads()}, kernels here {here}, auto calibration {cal['choice']}")
    params = {"models": models, "kernels": kernels, "sparsity": args.sparsity, "threads": torch.get_num_threads(),
              "omp_proc_bind": os.environ.get("OMP_PROC_BIND"), "omp_places": os.environ.get("OMP_PLACES"),
              "auto_choice": cal["choice"], "weights": "random values, random unstructured mask (speed does not "
              "depend on the values)"}
    extra = {"load_average": os.getloadavg()}
    saved = []
    if not args.no_overhead:
        ov = call_overhead([k for k in here if k != "portable"] or here, repeats=2000 if full else 200)
        log("fixed cost per linear call (us):\n" + ov.pivot_table(index="path", columns="kernel",
                                                                 values="fixed_cost_us").round(2).to_string())
        if full:
            saved.append(results.save(ov, "sparamx", f"call_overhead{args.suffix}", params=params, scale="full",
                                      extra=extra))
    df = decode_latency(models, args.sparsity, kernels, prompt=args.prompt if full else 16,
                        steps=args.steps or (32 if full else 4), rounds=args.rounds or (3 if full else 1),
                        warmup=4 if full else 1, layers=None if full else 2,
                        dense_amx="amx" in here and not args.no_dense_amx, log=log)
    if full:
        saved.append(results.save(df, "sparamx", f"{args.name}{args.suffix}", params=params, scale="full",
                                  extra=extra))
        if "llama3-8b" in set(df.model) and args.sparsity == 0.5:
            saved.append(results.save(e2e_claims(df), "sparamx", f"e2e_scorecard{args.suffix}", params=params,
                                      scale="full", extra=extra))
    log(f"saved {[str(p) for p in saved]}" if full else "scale ci: nothing saved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
