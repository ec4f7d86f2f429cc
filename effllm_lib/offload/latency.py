"""Prefill and decode throughput per model on one idle accelerator, and measured vs simulated time per mode.

``measure_throughputs`` times each model alone (batch 1, greedy, the token read back to the host every step as
the controller does) by four decode paths:

* ``dynamic``: ``DynamicCache``, eager (what the controller and the triggers run);
* ``static``: a preallocated ``StaticCache``, eager (fixed shapes, graph-capturable);
* ``compiled``: the static path with the decode step under ``torch.compile(mode="reduce-overhead")``, i.e. CUDA
  graphs on a GPU: a 135M model is launch-bound, so only this path lets the small model decode faster than the big
  one as its size says it should;
* ``generate``: transformers' own ``generate(cache_implementation="static")`` (which compiles the decode step itself
  on CUDA where the model supports it); prefill = a 1-token generate, decode = the rest.

A path the installed transformers/torch cannot run is recorded with its error (``status``), not raised. Prefill is
timed over ``prompt_tokens`` tokens (a realistic prompt, not a launch-bound 40-token one).

``latency_table`` then compares, per mode of a trigger evaluation (``trigger_eval`` records), the measured wall time
with (a) the sequential prediction from the records' token counts and the ``dynamic`` throughputs (what this
controller does: checks the accounting) and (b) the paper's pipelined simulator (``simulator.pipelined_time``) fed
with the fastest measured path of each model (what a pipelined two-GPU system would get); with the time in probes
and the handoffs per problem.

``python -m effllm_lib.offload.latency --small S --big B --device cuda --suffix _h200`` writes
``splitreason/throughput<suffix>``; with ``--records`` (a ``trigger_records`` CSV) also ``trigger_latency<suffix>``.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import pandas as pd
import torch

from .simulator import Throughput, big_only_time, pipelined_time

METHODS = ("dynamic", "static", "compiled", "generate")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_STATIC: dict = {}


def _static_cache(model, max_len: int):
    """One StaticCache per (model, length), reset between runs: a compiled step keeps its CUDA graph only while the
    cache tensors keep their addresses (transformers marks them static), so a new cache per run would recompile."""
    key = (id(model), max_len)
    if key in _STATIC:
        _STATIC[key].reset()
        return _STATIC[key]
    _STATIC[key] = _new_static_cache(model, max_len)
    return _STATIC[key]


def _new_static_cache(model, max_len: int):
    from transformers import StaticCache

    try:  # transformers 5.x: shapes come from the config, batch and device from the first update
        return StaticCache(config=model.config, max_cache_len=max_len)
    except TypeError:  # 4.x
        p = next(model.parameters())
        return StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device=p.device,
                           dtype=p.dtype)


def greedy_decode(model, ids: list[int], decode_tokens: int, method: str = "dynamic") -> dict:
    """Prefill ``ids`` then ``decode_tokens`` greedy steps by ``method`` (not ``generate``). Returns the tokens and
    the seconds of each phase (``compile_s``: the first compiled calls, when ``compiled``)."""
    if method not in ("dynamic", "static", "compiled"):
        raise ValueError(f"greedy_decode method must be dynamic, static or compiled, got {method!r}")
    if not ids or decode_tokens < 1:
        raise ValueError("greedy_decode needs a non-empty prompt and decode_tokens >= 1")
    from transformers import DynamicCache

    device = next(model.parameters()).device
    n = len(ids)
    # transformers 5.17 takes cache_position (a static cache needs it); 5.24 derives it from position_ids
    takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
    step = model.forward
    if method == "compiled":
        step = _compiled_step(model)

    def call(fn, tokens, start):
        pos = torch.arange(start, start + tokens.shape[1], device=device)
        kw = {"cache_position": pos} if takes_cache_position and method != "dynamic" else {}
        return fn(input_ids=tokens, position_ids=pos[None], past_key_values=cache, use_cache=True, logits_to_keep=1,
                  **kw)

    out_tokens = []
    with torch.inference_mode():  # the static cache is made (and reset) in inference mode, as it is used
        cache = DynamicCache() if method == "dynamic" else _static_cache(model, n + decode_tokens + 1)
        _sync(device)
        t0 = time.perf_counter()
        logits = call(model.forward, torch.tensor([ids], device=device), 0).logits
        tok = int(logits[0, -1].argmax())
        _sync(device)
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(decode_tokens):
            out_tokens.append(tok)
            logits = call(step, torch.tensor([[tok]], device=device), n + i).logits
            tok = int(logits[0, -1].argmax())  # read back: the controller needs the token on the host
        _sync(device)
        t_decode = time.perf_counter() - t0
    return {"tokens": out_tokens, "prefill_s": t_prefill, "decode_s": t_decode}


_COMPILED = {}


def _compiled_step(model):
    key = id(model)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False, dynamic=False)
    return _COMPILED[key]


def generate_decode(model, ids: list[int], decode_tokens: int) -> dict:
    """transformers' ``generate`` with a static cache: prefill = a 1-token generate, decode = the difference to a
    ``decode_tokens + 1`` generate (end-of-sequence suppressed so every run has its full length)."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)

    def run(k):
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=k, min_new_tokens=k,
                                 do_sample=False, cache_implementation="static", pad_token_id=0)
        _sync(device)
        return out[0, len(ids):].tolist(), time.perf_counter() - t0

    _, t1 = run(1)
    toks, tn = run(decode_tokens + 1)
    return {"tokens": toks[:decode_tokens], "prefill_s": t1, "decode_s": max(tn - t1, 1e-9)}


def prompt_ids(tokenizer, n: int) -> list[int]:
    """``n`` token ids of plain arithmetic text (content does not matter for timing, only the length)."""
    text = " ".join(f"Step {i}: {i * 7 % 13} + {i * 5 % 11} = {i * 7 % 13 + i * 5 % 11}." for i in range(4 * n))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < n:
        raise ValueError(f"the tokenizer gave {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def measure_throughputs(model, tokenizer, *, name: str = "model", methods=METHODS, prompt_tokens: int = 512,
                        decode_tokens: int = 128, repeats: int = 3) -> pd.DataFrame:
    """One row per method: prefill and decode tokens/s (medians of ``repeats`` after a warm-up that also pays
    compilation), their spread, and ``status`` ("ok" or the error)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; choose from {METHODS}")
    if prompt_tokens < 1 or decode_tokens < 2 or repeats < 1:
        raise ValueError("prompt_tokens >= 1, decode_tokens >= 2 and repeats >= 1 are needed")
    ids = prompt_ids(tokenizer, prompt_tokens)
    rows = []
    for method in methods:
        row = {"model": name, "method": method, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens}
        fn = (lambda k: generate_decode(model, ids, k)) if method == "generate" else \
            (lambda k, m=method: greedy_decode(model, ids, k, m))
        try:
            t0 = time.perf_counter()
            fn(decode_tokens)  # warm-up: allocator, kernels, compilation and graph capture
            row["warmup_s"] = time.perf_counter() - t0
            runs = [fn(decode_tokens) for _ in range(repeats)]
        except Exception as exc:  # noqa: BLE001 - a path this stack cannot run is a result, not a crash
            row["status"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            rows.append(row)
            continue
        pre = [prompt_tokens / r["prefill_s"] for r in runs]
        dec = [decode_tokens / r["decode_s"] for r in runs]
        row.update(status="ok", prefill_tok_s=statistics.median(pre), prefill_min=min(pre), prefill_max=max(pre),
                   decode_tok_s=statistics.median(dec), decode_min=min(dec), decode_max=max(dec),
                   ms_per_token=1e3 / statistics.median(dec), first_tokens=" ".join(map(str, runs[0]["tokens"][:8])))
        rows.append(row)
    return pd.DataFrame(rows)


def throughput_of(table: pd.DataFrame, model: str, method: str | None = None) -> Throughput:
    """The Throughput of ``model`` by ``method``, or by its fastest decode path that ran (``method=None``)."""
    ok = table[(table.model == model) & (table.status == "ok")]
    if method is not None:
        ok = ok[ok.method == method]
    if ok.empty:
        raise ValueError(f"no successful throughput row for {model!r}" + (f" by {method!r}" if method else ""))
    best = ok.loc[ok.decode_tok_s.idxmax()]
    return Throughput(float(best.prefill_tok_s), float(best.decode_tok_s))


def latency_table(records: pd.DataFrame, controller_tp: tuple[Throughput, Throughput],
                  best_tp: tuple[Throughput, Throughput], *, chunk_tokens: int = 16) -> pd.DataFrame:
    """Per mode (``label``), per problem on average: measured wall time and its parts (prefill, decode, probes;
    the big model's scoring of the small model's windows is in ``big_prefill_s``), handoffs, the sequential
    prediction (token counts / ``controller_tp``, the (small, big) throughputs of the controller's path) and the
    paper's pipelined simulation (``best_tp``, the fastest paths). Assisted generation has no simulation (NaN)."""
    need = {"label", "method", "wall_s", "small_prefill_tokens", "small_decode_tokens", "big_prefill_tokens",
            "big_decode_tokens", "small_kept_tokens", "big_kept_tokens", "small_prompt_tokens", "big_prompt_tokens"}
    missing = need - set(records.columns)
    if records.empty or missing:
        raise ValueError(f"records lack columns {sorted(missing)} (trigger_eval records with prompt token counts)")
    (cs, cb), (bs, bb) = controller_tp, best_tp
    rows = []
    for label, df in records.groupby("label", sort=False):
        method = df.method.iloc[0]
        seq, sim = [], []
        for r in df.to_dict("records"):
            probe_pre = r.get("small_probe_prefill_tokens", 0) or 0
            probe_dec = r.get("small_probe_decode_tokens", 0) or 0
            seq.append((r["small_prefill_tokens"] + probe_pre) / cs.prefill
                       + (r["small_decode_tokens"] + probe_dec) / cs.decode
                       + r["big_prefill_tokens"] / cb.prefill + r["big_decode_tokens"] / cb.decode)
            n = max(1, int(r["small_kept_tokens"] + r["big_kept_tokens"]))
            if method == "assisted":
                sim.append(float("nan"))
            elif method == "big":
                sim.append(big_only_time(bb, int(r["big_prompt_tokens"]), n))
            elif method == "small":
                sim.append(int(r["small_prompt_tokens"]) / bs.prefill + n / bs.decode)
            else:
                frac = min(1.0, r["big_kept_tokens"] / n)
                sim.append(pipelined_time(bs, bb, frac, prefill_tokens=int(r["small_prompt_tokens"]),
                                          decode_tokens=n, chunk_tokens=min(chunk_tokens, n))["total_s"])
        row = {"mode": label, "method": method, "problems": len(df), "measured_s": df.wall_s.mean(),
               "handoffs_per_problem": df["handoffs"].mean() if "handoffs" in df else float("nan"),
               "sequential_s": statistics.fmean(seq), "pipelined_sim_s": statistics.fmean(sim)}
        for col in ("small_prefill_s", "small_decode_s", "small_probe_s", "big_prefill_s", "big_decode_s"):
            row[col] = df[col].mean() if col in df else float("nan")
        row["measured_over_sequential"] = row["measured_s"] / row["sequential_s"]
        row["measured_over_pipelined"] = row["measured_s"] / row["pipelined_sim_s"]
        rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m effllm_lib.offload.latency", description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", default="smollm2-135m", help="packaged name, .gguf, transformers folder or tiny:...")
    ap.add_argument("--big", default="qwen2.5-1.5b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--records", default=None, help="a trigger_records CSV: also write trigger_latency<suffix>")
    ap.add_argument("--chunk-tokens", type=int, default=16, help="simulator chunk (the triggers' big span)")
    ap.add_argument("--scale", default="full", choices=["ci", "full"])
    ap.add_argument("--suffix", default="")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    from .. import results
    from .parallel import hardware_info
    from .trigger_eval import _load

    methods = [m for m in args.methods.split(",") if m]
    tables = []
    for role, spec in (("small", args.small), ("big", args.big)):
        model, tok = _load(spec, args.dtype, args.device)
        t = measure_throughputs(model, tok, name=role, methods=methods, prompt_tokens=args.prompt_tokens,
                                decode_tokens=args.decode_tokens, repeats=args.repeats)
        t.insert(1, "spec", spec)
        tables.append(t)
        print(t.drop(columns=["first_tokens"], errors="ignore").round(2).to_string(index=False), flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    table = pd.concat(tables, ignore_index=True)
    params = {k: v for k, v in vars(args).items() if k not in ("no_save", "suffix")}
    extra = {"run_hardware": hardware_info(args.device)}
    if not args.no_save:
        results.save(table, "splitreason", f"throughput{args.suffix}", params=params, scale=args.scale, extra=extra)
    if args.records:
        records = results.read(args.records)
        lat = latency_table(records, (throughput_of(table, "small", "dynamic"), throughput_of(table, "big", "dynamic")),
                            (throughput_of(table, "small"), throughput_of(table, "big")),
                            chunk_tokens=args.chunk_tokens)
        print(lat.round(3).to_string(index=False), flush=True)
        if not args.no_save:
            results.save(lat, "splitreason", f"trigger_latency{args.suffix}", params=params, scale=args.scale,
                         extra=extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
