"""End-to-end decode tokens/s at batch 1: packed BitMoD (3 and 4 bits) vs torch bf16 vs torch int4 weight-only.

    python benchmarks/bitmod_e2e.py --scale ci        # CPU smoke test: 2 layers of each model (minutes on 2 cores)
    python benchmarks/bitmod_e2e.py --device cuda --tag _h200 --gguf PATH         # GPU: SmolLM2 + Llama-3-8B
    python benchmarks/bitmod_e2e.py --device cpu --tag _xeon --models llama3-8b   # CPU kernels (AVX-512 / AVX2)

Models (--models):
  smollm2-135m  the packaged SmolLM2-135M-Instruct (real weights: the GGUF, dequantized; ``--gguf`` takes its path,
                or its parts comma-separated, joined in order and checked against the recorded sha256; without
                it the cached conversion is used). BitMoD: ``quantize_(model, BitMoDConfig(bits, group_size=128,
                packed=True))`` (lm_head included, untied from the embedding, as the paper quantizes it); int4:
                every projection and lm_head through ``Int4Linear`` (gpt-fast's asymmetric group quantization,
                group 64: SmolLM2's 576 inputs are not a multiple of 128).
  llama3-8b     a Llama-3-8B-shaped bf16 model with random weights (effllm_lib.sparse.decode_bench.random_model,
                no mask); the BitMoD and int4 variants are random packed weights of the same shapes (group 128),
                every projection and lm_head: a decode step's time does not depend on the values.

Per model and implementation (torch_bf16, bitmod_4bit, bitmod_3bit, torch_int4): ``--prompt`` tokens fed one
step at a time, then ``--steps`` greedy decode steps, in ``--rounds`` rounds whose order rotates; each step on a
GPU is one CUDA-graph replay of ``StaticDecoder.advance`` (effllm_lib/bitmod/e2e.py: static KV cache, no
Python or launch overhead), on CPU a Python call. Reported: the median ms per token with p10/p90 over all steps
of all rounds, tokens/s, speedup over torch bf16 measured in the same run, bytes read per token
(``e2e.bytes_per_token``: stored bytes of every projection and lm_head, one embedding row, the KV cache at the
mean context), the ceiling tokens/s = read bandwidth measured in this run / bytes per token, and the fraction
of it reached. ``agree_with_bf16``: the fraction of decode steps fed the same token as bf16 (real model only).
On the real model, a check that the static decoder's logits after the prompt match transformers' own forward
of the same (quantized) model, which on a GPU runs the multi-token Triton path: ``logits_rel_err_vs_hf``.

``--profile N``: afterwards N eager steps per implementation under torch.profiler, kernel time per step by class
(``e2e.step_profile``), written to e2e_profile_{gpu,cpu}[_model]<tag>: the sum of kernel time against the measured
step says what the step spends outside the projections' kernels.

Writes data/results/bitmod/e2e_{gpu,cpu}<tag>.csv, or e2e_{gpu,cpu}_{smollm2,llama8b}<tag>.csv when --models
names one model (scale full; --scale ci: data/results/bitmod/ci/).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from effllm_lib import results
from effllm_lib.bitmod import e2e
from effllm_lib.bitmod.quantize import BitMoDConfig, quantize_

MODELS = ("smollm2-135m", "llama3-8b")
SHORT = {"smollm2-135m": "smollm2", "llama3-8b": "llama8b"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gguf_file(spec: str) -> Path:
    """The GGUF at ``spec``, or its parts (comma-separated) joined into a temporary file; sha256 checked."""
    from effllm_lib import assets

    want = assets.SHA256["smollm2-135m"]["SmolLM2-135M-Instruct.Q4_1.gguf"]
    parts = [Path(p) for p in spec.split(",") if p]
    missing = [str(p) for p in parts if not p.is_file()]
    if not parts or missing:
        raise FileNotFoundError(f"--gguf: no such file(s) {missing or spec!r}")
    target = Path(tempfile.mkdtemp(prefix="bitmod_e2e_")) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    h = hashlib.sha256()
    with open(target, "wb") as out:
        for p in parts:
            data = p.read_bytes()
            h.update(data)
            out.write(data)
    if h.hexdigest() != want:
        raise ValueError(f"--gguf {spec}: sha256 {h.hexdigest()[:16]}... is not SmolLM2-135M-Instruct.Q4_1's")
    return target


def smollm2(gguf: str | None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from effllm_lib import models

    if gguf is None:
        return models.load_causal_lm("smollm2-135m", dtype=torch.bfloat16)[0]
    path = gguf_file(gguf)
    folder = path.parent / "hf"
    models.convert_gguf(path, folder, dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()


def int4_model(model: torch.nn.Module) -> dict:
    return {n: e2e.Int4Linear.from_linear(model.get_submodule(n)) for n in e2e.decoder_linears(model)}


def variants(name: str, bits_list, device: str, layers: int | None, gguf: str | None):
    """(bf16 model, {impl: (decoder-ready model, overrides)}, notes)."""
    notes = {}
    if name == "smollm2-135m":
        model = smollm2(gguf)
        if layers is not None:   # a smoke test: the first layers of the real model
            model.model.layers = model.model.layers[:layers]
            model.config.num_hidden_layers = layers
        out = {"torch_bf16": (model, None)}
        for bits in bits_list:
            t0 = time.perf_counter()
            q = copy.deepcopy(model)
            report = quantize_(q, BitMoDConfig(bits=bits, group_size=128, packed=True))
            notes[f"quantize_{bits}bit_s"] = round(time.perf_counter() - t0, 1)
            notes[f"quantized_layers_{bits}bit"] = len(report.layers)
            out[f"bitmod_{bits}bit"] = (q.to(device), None)
        model.to(device)
        out["torch_int4"] = (model, int4_model(model))
        notes["weights"] = "real: SmolLM2-135M-Instruct GGUF (Q4_1) dequantized to bf16"
        return out, notes
    from effllm_lib.sparse.decode_bench import random_model

    t0 = time.perf_counter()
    model = random_model(name, sparsity=0.0, layers=layers).to(device)
    out = {"torch_bf16": (model, None)}
    for bits in bits_list:
        out[f"bitmod_{bits}bit"] = (model, e2e.random_overrides(model, "bitmod", bits=bits, seed=bits))
    out["torch_int4"] = (model, e2e.random_overrides(model, "int4", seed=5))
    notes["weights"] = "random (speed does not depend on the values); packed/int4 variants random codes and scales"
    notes["build_s"] = round(time.perf_counter() - t0, 1)
    return out, notes


def read_bandwidth(device: str, full: bool) -> tuple[float, str]:
    if device == "cuda":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bitmod_kernels import hbm_read_bandwidth
        return hbm_read_bandwidth(), "torch.sum over a 4 GiB float32 buffer, median of 20 (CUDA events)"
    from effllm_lib.sparse.bench import measure_read_bandwidth

    probe = measure_read_bandwidth(None if full else 64 * 2**20, repeats=5 if full else 3, dense=False)
    return probe["bytes_per_s"], probe["method"]


@torch.no_grad()
def run_model(name, args, device, bw) -> tuple[list[dict], dict]:
    vs, notes = variants(name, args.bits, device, args.layers, args.gguf)
    g = torch.Generator().manual_seed(0)
    vocab = vs["torch_bf16"][0].config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt,), generator=g).tolist()
    max_len = args.prompt + args.steps + 8
    decs, steppers = {}, {}
    for impl, (model, over) in vs.items():
        t0 = time.perf_counter()
        dec = e2e.StaticDecoder(model, max_len, overrides=over)
        tok, pos, logits = e2e.prefill(dec, prompt)
        if name == "smollm2-135m":   # the decoder against transformers' forward of the same layers
            if over is None:   # (a failure here is recorded: it must not cost the decode measurement)
                try:
                    ref = model(input_ids=torch.tensor([prompt], device=device)).logits[0, -1].float()
                    notes[f"logits_rel_err_vs_hf_{impl}"] = round(float((logits[0] - ref).norm() / ref.norm()), 5)
                except Exception as exc:  # noqa: BLE001
                    notes[f"logits_rel_err_vs_hf_{impl}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        if device == "cuda":
            try:
                steppers[impl] = e2e.GraphedStep(dec, tok, pos)
            except Exception as exc:  # noqa: BLE001 - recorded; that implementation is then timed eagerly
                notes[f"graph_failed_{impl}"] = f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.synchronize()
        decs[impl] = dec
        notes[f"setup_s_{impl}"] = round(time.perf_counter() - t0, 1)
        log(f"{name} {impl}: ready in {notes[f'setup_s_{impl}']} s")
    times = {impl: [] for impl in decs}
    fed = {}
    impls = list(decs)
    for r in range(args.rounds):
        for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
            ts, toks = e2e.decode_times(decs[impl], prompt, args.steps, step_fn=steppers.get(impl),
                                        graph=impl in steppers)
            times[impl] += ts
            fed[impl] = toks
    rows = []
    base = e2e.spread(times["torch_bf16"])["ms_per_token"]
    for impl, ts in times.items():
        s = e2e.spread(ts)
        b = e2e.bytes_per_token(decs[impl], context=args.prompt + args.steps // 2)
        ceiling = bw / b["total"]
        bits = int(impl.split("_")[1][0]) if impl.startswith("bitmod") else (4 if impl == "torch_int4" else 16)
        rows.append({"model": name, "impl": impl, "bits": bits, "cuda_graph": impl in steppers, **s,
                     "speedup_vs_bf16": base / s["ms_per_token"],
                     "bytes_per_token": b["total"], "linear_bytes": b["linears"], "ceiling_tokens_per_s": ceiling,
                     "frac_of_ceiling": s["tokens_per_s"] / ceiling,
                     "agree_with_bf16": (sum(a == c for a, c in zip(fed[impl], fed["torch_bf16"])) / args.steps
                                         if name == "smollm2-135m" else None)})
        log(f"{name} {impl}: {s['tokens_per_s']:.1f} tok/s ({s['ms_per_token']:.3f} ms, p10 {s['p10_ms']:.3f}, "
            f"p90 {s['p90_ms']:.3f}), {rows[-1]['speedup_vs_bf16']:.2f}x bf16, {rows[-1]['frac_of_ceiling']:.0%} "
            f"of the {ceiling:.0f} tok/s ceiling")
    profile = []
    if args.profile:   # after the timing, so the profiler cannot perturb it
        for impl in impls:
            prof = e2e.step_profile(decs[impl], prompt, steps=args.profile)
            step_ms = e2e.spread(times[impl])["ms_per_token"]
            prof.insert(0, "impl", impl)
            prof.insert(0, "model", name)
            prof["step_ms_measured"] = step_ms
            prof["kernel_ms_per_step"] = prof.us_per_step.sum() / 1e3
            profile.append(prof)
            log(f"{name} {impl}: kernels {prof.us_per_step.sum() / 1e3:.3f} ms of the {step_ms:.3f} ms step; "
                + ", ".join(f"{r.kernel_class} {r.us_per_step / 1e3:.3f} ms ({r.kernels_per_step:.0f} kernels)"
                            for r in prof.itertuples()))
    del decs, steppers, vs
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows, {f"{name}_{k}": v for k, v in notes.items()}, profile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("ci", "full"), default="full")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF path, or its parts comma-separated (in order)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32 GPU, 8 CPU, 4 ci)")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per round (default 64 GPU, 16 CPU)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers kept (default: all; ci: 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: all cores)")
    ap.add_argument("--tag", default="", help="appended to the results name (e.g. _h200)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also profile STEPS eager decode steps per implementation (e2e.step_profile: kernel time "
                         "by class: projections, attention, the elementwise glue) and write e2e_profile_*")
    args = ap.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or set(names) - set(MODELS) or len(set(names)) != len(names):
        ap.error(f"--models takes a subset of {MODELS}")
    args.bits = [int(b) for b in args.bits.split(",")]
    if set(args.bits) - {3, 4}:
        ap.error("--bits takes 3 and/or 4")
    full = args.scale == "full"
    if not full:   # a smoke test: 2 layers of the random model, few steps
        args.layers = args.layers or 2
        args.prompt, args.steps, args.rounds = args.prompt or 4, args.steps or 4, min(args.rounds, 2)
    args.prompt = args.prompt or (32 if device == "cuda" else 8)
    args.steps = args.steps or (64 if device == "cuda" else 16)
    if args.threads:
        torch.set_num_threads(args.threads)
    bw, bw_method = read_bandwidth(device, full)
    log(f"{device}: read bandwidth {bw / 1e9:.1f} GB/s ({bw_method}); {torch.get_num_threads()} threads")
    if args.profile < 0:
        ap.error("--profile takes a number of steps >= 0")
    rows, notes, profile = [], {}, []
    for name in names:
        r, n, p = run_model(name, args, device, bw)
        rows += r
        notes.update(n)
        profile += p
    params = {"device": device, "prompt": args.prompt, "steps": args.steps, "rounds": args.rounds,
              "bits": args.bits, "group_size": 128, "layers": args.layers or "all", "read_gbs": round(bw / 1e9, 2),
              "bandwidth_method": bw_method, "threads": torch.get_num_threads(),
              "timing": ("one CUDA graph replay per decode step (StaticDecoder.advance), CUDA events"
                         if device == "cuda" else "one Python call per decode step, perf_counter"),
              "bitmod_kernel": "Triton (autotuned on first use)" if device == "cuda" else "cpu_gemv (widest SIMD)",
              "torch_int4": ("aten._weight_int4pack_mm (tinygemm)" if device == "cuda"
                             else "aten._weight_int4pack_mm_for_cpu") + ", asymmetric, group 128 (64 for SmolLM2)",
              "bytes_per_token": "every projection + lm_head as stored, one embedding row, KV cache at prompt + "
                                 "steps/2", **notes}
    part = "gpu" if device == "cuda" else "cpu"
    # one file per run: both models, or one (device calls are short, so the lead may run them separately)
    stem = f"e2e_{part}" if len(names) == len(MODELS) else f"e2e_{part}_{SHORT[names[0]]}"
    path = results.save(pd.DataFrame(rows), "bitmod", f"{stem}{args.tag}", params=params, scale=args.scale,
                        extra={"load_average": os.getloadavg()})
    log(f"saved {path}")
    if profile:
        path = results.save(pd.concat(profile, ignore_index=True), "bitmod", stem.replace("e2e_", "e2e_profile_", 1)
                            + args.tag, params={**params, "profile_steps": args.profile,
                                                "profile": "torch.profiler over eager steps; GPU: CUDA kernel "
                                                           "time, CPU: aten ops' self time"},
                            scale=args.scale, extra={"load_average": os.getloadavg()})
        log(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
