"""Sparse KV-cache attention vs dense: attention alone, end-to-end decode, and the quality cost of KV pruning
(effllm_lib.sparse.kv_bench, effllm_lib.sparse.quality.kv_pruning_quality).

    python benchmarks/sparse_kv_attention.py --scale ci                                # small, prints only
    python benchmarks/sparse_kv_attention.py --part attention --suffix _xeon           # contexts 4k-16k
    python benchmarks/sparse_kv_attention.py --part e2e --suffix _xeon                 # Llama-3-8B shape
    python benchmarks/sparse_kv_attention.py --part quality                            # SmolLM2-135M, real text

Parts (``--part``, comma-separated, default attention,e2e):
* attention: one decode token over one layer's cache of the Llama-3-8B shape (32 query / 8 KV heads, dim 128,
  bf16), torch SDPA and eager attention and our kernel on the unpruned cache (``dense_<kernel>``, no bitmaps)
  vs the sparse op per kernel and KV sparsity, caches cycled past the last-level cache; bytes read, the byte
  bound at the best read rate measured, ratios vs the fastest candidate that keeps every entry (with an
  interval over the passes) and vs SDPA. About 2 minutes on the 16-core Xeon (mostly building the caches).
  Writes data/results/sparamx/kv_attention_latency<suffix>.
* e2e: batch-1 decode of a random-weight Llama-3-8B-shaped model (``--model``) with its cache filled to each
  context: the stock cache + SDPA, a preallocated cache + grouped SDPA, our kernel on the unpruned cache
  (``dense_kv_ownkernel_<kernel>``) and ``SparseKVCache`` at ``--e2e-sparsity``, in ``--rounds`` short rotated
  rounds (``--warmup`` + ``--steps`` tokens); speed-up over the fastest dense candidate with an order-statistic
  interval over the per-round paired ratios, ceiling from bytes per token. About 4-5 minutes for contexts
  4096,16384 on the 16-core Xeon. Writes kv_decode_latency<suffix> and, with dense weights,
  kv_scorecard<suffix> (claim kv_sparsity_speedup: the speed-up at the longest context, with ours_lo/ours_hi),
  but only if the interval does not lie wholly above the byte ceiling (otherwise it prints why and writes no
  scorecard). ``--weight-sparsity 0.5`` runs the linears through the sparse kernels too (the paper's whole
  system; use another suffix).
* quality: SmolLM2-135M (``--quality-model``) on the packaged Wikipedia text, prompt ``--quality-context``
  tokens, ``--quality-continuation`` tokens decoded with teacher forcing, K/V of the prompt pruned at each
  sparsity: perplexity, top-1 accuracy drop in points, agreement with dense, KL. Writes kv_pruning_quality
  (+ _windows) and kv_accuracy_scorecard (claim kv_sparsity_accuracy at 50 %). The quality does not depend
  on the machine: no suffix is needed, but one is applied if given.

Threads are pinned (OMP_PROC_BIND=close, OMP_PLACES=cores, set before torch loads, unless already set).
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
from effllm_lib.sparse.kv_cache import available_kv_kernels  # noqa: E402

PARTS = ("attention", "e2e", "quality")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("ci", "full"), default="full", help="ci: small shapes, nothing saved")
    ap.add_argument("--part", default="attention,e2e", help=f"comma-separated: {', '.join(PARTS)}")
    ap.add_argument("--contexts", default="4096,8192,16384", help="cached tokens (attention and e2e)")
    ap.add_argument("--sparsities", default="0,0.3,0.5,0.7,0.9", help="KV sparsities of the attention part")
    ap.add_argument("--kernels", default="auto", help="KV kernels: auto, portable, avx2, avx512 (comma-separated)")
    ap.add_argument("--repeats", type=int, default=5, help="attention: passes over all cycled layers")
    ap.add_argument("--model", default="llama3-8b", help="e2e: a model shape of decode_bench.MODEL_CONFIGS")
    ap.add_argument("--layers", type=int, default=None, help="e2e: decoder layers (default: the model's)")
    ap.add_argument("--e2e-sparsity", type=float, default=0.5)
    ap.add_argument("--weight-sparsity", type=float, default=None,
                    help="e2e: also run the decoder linears through the sparse kernels at this mask sparsity")
    ap.add_argument("--steps", type=int, default=4, help="e2e: timed tokens per candidate per round")
    ap.add_argument("--warmup", type=int, default=1, help="e2e: untimed tokens per candidate per round")
    ap.add_argument("--rounds", type=int, default=10, help="e2e: rounds (the interval is over them; >= 2)")
    ap.add_argument("--quality-model", default="smollm2-135m")
    ap.add_argument("--quality-sparsities", default="0,0.3,0.5,0.7,0.9")
    ap.add_argument("--quality-context", type=int, default=1024)
    ap.add_argument("--quality-continuation", type=int, default=32)
    ap.add_argument("--quality-windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--suffix", default="", help="appended to every results name (e.g. _xeon)")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        ap.error(f"--part: unknown {bad}; choose from {', '.join(PARTS)}")
    here = available_kv_kernels()
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    missing = [k for k in kernels if k != "auto" and k not in here]
    if missing:
        print(f"--kernels {missing} cannot run here (available: {list(here)})", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    full = args.scale == "full"
    params = {"kernels": kernels, "threads": torch.get_num_threads(), "kv_kernels_here": list(here),
              "omp_proc_bind": os.environ.get("OMP_PROC_BIND"), "omp_places": os.environ.get("OMP_PLACES")}
    extra = {"load_average": os.getloadavg()}
    saved = []
    log(f"threads {torch.get_num_threads()}, KV kernels here {list(here)}, parts {parts}")

    if "attention" in parts:
        from effllm_lib.sparse.kv_bench import attention_latency

        contexts = _ints(args.contexts) if full else [512, 2048]
        sparsities = _floats(args.sparsities) if full else [0.0, 0.5]
        shape = {} if full else {"query_heads": 9, "kv_heads": 3, "head_dim": 64}
        att = attention_latency(contexts, sparsities, kernels, repeats=args.repeats if full else 1, log=log, **shape)
        if full:
            p = dict(params, contexts=contexts, sparsities=sparsities, repeats=args.repeats,
                     caches="random bf16 values, random unstructured mask at each sparsity (speed depends on the "
                            "nonzero count and spread, not on the values)")
            saved.append(results.save(att, "sparamx", f"kv_attention_latency{args.suffix}", params=p, scale="full",
                                      extra=extra))

    if "e2e" in parts:
        from effllm_lib.sparse.kv_bench import decode_latency_kv

        contexts = _ints(args.contexts) if full else [256, 1024]
        from effllm_lib.sparse.kv_bench import kv_speedup_claim

        e2e = decode_latency_kv(args.model if full else "smollm2-135m", contexts, args.e2e_sparsity, kernels,
                                steps=args.steps if full else 2, rounds=args.rounds if full else 3,
                                warmup=args.warmup if full else 1, layers=args.layers if full else 2,
                                weight_sparsity=args.weight_sparsity, log=log)
        claim, why = kv_speedup_claim(e2e)
        log(f"kv_sparsity_speedup: {why}" if claim is None else f"kv_sparsity_speedup row: {claim['reason']}")
        if full:
            p = dict(params, model=args.model, layers=args.layers, contexts=contexts, kv_sparsity=args.e2e_sparsity,
                     weight_sparsity=args.weight_sparsity, steps=args.steps, warmup=args.warmup, rounds=args.rounds,
                     weights="random values (speed does not depend on them)")
            saved.append(results.save(e2e, "sparamx", f"kv_decode_latency{args.suffix}", params=p, scale="full",
                                      extra=extra))
            if (args.model == "llama3-8b" and args.e2e_sparsity == 0.5 and args.layers is None
                    and args.weight_sparsity is None):  # one file per claim: the dense-weights run
                if claim is None:
                    log(f"kv_scorecard{args.suffix} NOT written: {why}")
                else:
                    saved.append(results.save(pd.DataFrame([claim]), "sparamx", f"kv_scorecard{args.suffix}",
                                              params=p, scale="full", extra=extra))

    if "quality" in parts:
        from effllm_lib.sparse.quality import kv_pruning_quality

        if full:
            q, pw = kv_pruning_quality(args.quality_model, _floats(args.quality_sparsities),
                                       context=args.quality_context, continuation=args.quality_continuation,
                                       windows=args.quality_windows, kernel=kernels[0])
        else:
            q, pw = kv_pruning_quality("tiny-llama", (0.0, 0.5), context=200, continuation=6, windows=2, scale="ci",
                                       kernel=kernels[0])
        log("\n" + q[["config", "perplexity", "ppl_lo", "ppl_hi", "top1_acc", "acc_drop_points", "drop_lo",
                      "drop_hi", "agree_pct", "kl_per_token"]].round(3).to_string(index=False))
        if full:
            p = dict(params, model=args.quality_model, sparsities=_floats(args.quality_sparsities),
                     context=args.quality_context, continuation=args.quality_continuation,
                     windows=args.quality_windows, text="packaged English Wikipedia minus the ci slice",
                     dtype="float32 model, bf16 packed cache")
            saved.append(results.save(q, "sparamx", f"kv_pruning_quality{args.suffix}", params=p, scale="full",
                                      extra=extra))
            saved.append(results.save(pw, "sparamx", f"kv_pruning_quality_windows{args.suffix}", params=p,
                                      scale="full", extra=extra))
            half = q[q.config == "0.5"]
            if len(half):
                r = half.iloc[0]
                card = pd.DataFrame([{"claim_id": "kv_sparsity_accuracy", "ours": r.acc_drop_points,
                                      "ours_lo": r.drop_lo, "ours_hi": r.drop_hi, "status": "measured",
                                      "reason": (f"{args.quality_model}, K and V of a {args.quality_context}-token "
                                                 f"prompt pruned 50% by magnitude: top-1 next-token accuracy drop "
                                                 f"over {int(r.tokens)} decoded tokens ({int(r.windows)} windows), "
                                                 f"perplexity {r.perplexity:.2f} vs dense "
                                                 f"{float(q[q.config == 'dense'].perplexity.iloc[0]):.2f}")}])
                saved.append(results.save(card, "sparamx", f"kv_accuracy_scorecard{args.suffix}", params=p,
                                          scale="full", extra=extra))
    log(f"saved {[str(s) for s in saved]}" if full else "scale ci: nothing saved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
