"""The BitMoD accuracy study: every data type at 3 and 4 bits on a model, KL divergence, perplexity, zero-shot.

Primary measurement (``kl_sweep``, CLI ``--what kl``): every method x bits x clipping x calibration scored on
ALL windows of the text (next-token NLL) and, on ``kl_windows`` of them, the per-token KL divergence of the
quantized model's next-token distribution from the float model's; ``summarize`` gives perplexity and KL with
bootstrap intervals over windows and ``orderings`` the paper's comparisons paired window by window, e.g.

    python -m effllm_lib.bitmod.accuracy --model smollm2-135m --gguf smol.gguf --tokenizer tok \
        --text wikipedia=wiki.txt --calib-text austen.txt --bits 3 --clip 0,1 --calibration none \
        --kl-windows 64 --batch-size 8 --matmul-precision high --out OUT --tag w3
    python -m effllm_lib.bitmod.accuracy --summarize OUT/windows_*.csv --out OUT   # merge several runs

A long sweep spans several calls of a time-limited machine: ``--max-minutes M`` stops before a configuration that
would not fit (the windows and accuracy files are saved after every configuration, their params saying
``complete: false`` and which ``configs_done``), and the same command with ``--resume`` continues the windows file
in OUT, refusing one written from other model weights (sha256), texts or settings. The orderings file is written
only once the sweep is complete.

The older per-configuration tables:

    df = perplexity_sweep(lambda: load_causal_lm("smollm2-135m"), {"wikipedia": text}, bits=(3, 4))
    claims = claim_rows(df, synthetic, zero_shot)   # scorecard rows for data/paper/bitmod.csv

Each configuration starts from a fresh copy of the float model, fake-quantizes it with ``quantize_`` and
evaluates it with ``effllm_lib.eval``. The same code runs on the CPU (CI slices) and on a GPU (the full
sweeps committed under data/results/bitmod/); ``python -m effllm_lib.bitmod.accuracy --help`` runs a sweep
from files alone (a GGUF and tokenizer folder, text files, BIG-bench task files) on a machine with no assets.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import math

import numpy as np
import pandas as pd
import torch

from .. import eval as E
from .quantize import BitMoDConfig, calibration_ignored, clip_ignored, quantize_

# The methods of the paper's perplexity study (plus the modern micro-scaling baselines), in plotting order.
METHODS = ("int", "int_asym", "fp", "er", "ea", "ant", "olive", "nf4", "iq4_nl", "q4_k", "q3_k", "mxfp", "nvfp",
           "bitmod")
FOUR_BIT_ONLY = ("flint", "nf4", "iq4_nl", "q4_k")
THREE_BIT_ONLY = ("q3_k",)
LABELS = {"float": "float (dequantized GGUF)", "int": "INT sym", "int_asym": "INT asym", "fp": "FP",
          "er": "ER only", "ea": "EA only", "ant": "ANT", "olive": "OliVe", "nf4": "NF4", "iq4_nl": "IQ4_NL",
          "q4_k": "Q4_K", "q3_k": "Q3_K", "mxfp": "MX-FP", "nvfp": "NVFP",
          "bitmod": "BitMoD"}
ZERO_SHOT_TASKS = ("physical_intuition", "general_knowledge", "riddle_sense", "social_iqa", "strategyqa",
                   "sports_understanding")


def configs(methods=METHODS, bits=(3, 4), group_size: int = 128, include_float: bool = True):
    """[None (the float model), BitMoDConfig, ...] for every method x bits."""
    out = [None] if include_float else []
    for b in bits:
        for m in methods:
            if (m in FOUR_BIT_ONLY and b != 4) or (m in THREE_BIT_ONLY and b != 3):
                continue
            out.append(BitMoDConfig(bits=b, group_size=group_size, dtype=m))
    return out


def _quantized(base, cfg):
    """A fresh copy of ``base`` quantized with ``cfg`` (or the float copy) and its report (or None)."""
    model = copy.deepcopy(base)
    report = quantize_(model, cfg) if cfg is not None else None
    return model, report


def _report_fields(cfg, report) -> dict:
    if cfg is None:
        return {"dtype": "float", "bits": 16, "group_size": 0, "bits_per_weight": 16.0,
                "nominal_bits_per_weight": 16.0, "weight_mse": 0.0, "quant_seconds": 0.0, "types": "{}"}
    return {"dtype": cfg.dtype, "bits": cfg.bits, "group_size": cfg.effective_group_size,
            "bits_per_weight": report.bits_per_weight, "nominal_bits_per_weight": report.nominal_bits_per_weight,
            "weight_mse": report.mse, "quant_seconds": report.seconds,
            "types": json.dumps({k: round(v, 4) for k, v in report.type_fractions.items()})}


def perplexity_sweep(load: Callable, texts: dict[str, str], methods=METHODS, bits=(3, 4), group_size: int = 128,
                     seq_len: int | None = None, max_windows: int | None = None, model_name: str = "",
                     progress: bool = True, bos="auto", log: Callable | None = None) -> pd.DataFrame:
    """Perplexity of the float model and every method x bits on every text; one row per (config, text)."""
    if not texts:
        raise ValueError("texts must name at least one corpus")
    base, tok = load()
    token_ids = {corpus: tok(text, add_special_tokens=False)["input_ids"] for corpus, text in texts.items()}
    rows = []
    for cfg in configs(methods, bits, group_size):
        model, report = _quantized(base, cfg)
        for corpus, text in texts.items():
            label = "float" if cfg is None else cfg.label
            r = E.perplexity(model, tok, text, seq_len=seq_len, max_windows=max_windows, bos=bos,
                             progress=progress, desc=f"{label} {corpus}", token_ids=token_ids[corpus])
            rows.append({"model": model_name, "corpus": corpus, **_report_fields(cfg, report), "ppl": r.ppl,
                         "nll": r.nll, "tokens": r.tokens, "windows": r.windows, "total_windows": r.total_windows,
                         "seq_len": r.seq_len, "bos": r.bos, "eval_seconds": r.seconds})
            if log:
                log(f"{label:>10} {corpus:>10} ppl {r.ppl:8.3f} ({r.windows} windows, {r.seconds:.1f} s)")
        del model
    return pd.DataFrame(rows)


def zero_shot_sweep(load: Callable, tasks: dict[str, list], methods=("bitmod", "ant", "olive", "int_asym"),
                    bits=(4, 3), group_size: int = 128, model_name: str = "", progress: bool = True,
                    bos="auto", log: Callable | None = None) -> pd.DataFrame:
    """Zero-shot multiple-choice accuracy (``tasks``: name -> list of ``eval.MCExample``) per config x task."""
    base, tok = load()
    rows = []
    for cfg in configs(methods, bits, group_size):
        model, report = _quantized(base, cfg)
        for task, examples in tasks.items():
            start = time.perf_counter()
            r = E.multiple_choice_accuracy(model, tok, examples, bos=bos, progress=progress,
                                           desc=f"{'float' if cfg is None else cfg.label} {task}")
            rows.append({"model": model_name, "task": task, **_report_fields(cfg, report), "accuracy": r.accuracy,
                         "accuracy_norm": r.accuracy_norm, "n": r.n, "chance": r.chance,
                         # one letter per question (Y right, N wrong): a string CSV readers keep as text
                         "correct": "".join("Y" if c else "N" for c in r.correct),
                         "eval_seconds": time.perf_counter() - start})
            if log:
                log(f"{rows[-1]['dtype']}{rows[-1]['bits']:>3} {task:>22} acc {r.accuracy:.3f} (chance {r.chance:.3f})")
        del model
    return pd.DataFrame(rows)


def accuracy_loss(zero_shot: pd.DataFrame, dtype: str = "bitmod", bits: int = 4) -> pd.DataFrame:
    """Per model and task: float accuracy, quantized accuracy, and the loss in percentage points."""
    f = zero_shot[zero_shot.dtype == "float"].set_index(["model", "task"])
    q = zero_shot[(zero_shot.dtype == dtype) & (zero_shot.bits == bits)].set_index(["model", "task"])
    out = pd.DataFrame({"float": f.accuracy, "quantized": q.accuracy, "n": f.n}).dropna()
    out["loss_pp"] = 100 * (out["float"] - out["quantized"])
    return out.reset_index()


# ------------------------------------------------------------------- KL and perplexity, per window, with intervals
# The primary measurement: for every configuration, per window of the text, the summed next-token NLL (all
# windows) and the summed KL divergence from the float model (``kl_windows`` of them, spread over the text).
# Statistics are ratios of sums over windows; intervals come from resampling windows (a cluster bootstrap:
# tokens within a window are correlated), with the SAME resamples for every configuration, so a comparison of
# two configurations is paired window by window.
SETTING = ["model", "corpus", "bits", "clip", "calibration"]


def sweep_configs(methods=METHODS, bits=(3, 4), clips=(False, True), calibrations=("none",),
                  group_size: int = 128, calib_methods=None, calib_clips=None) -> list[BitMoDConfig]:
    """Every method x bits x clipping x calibration (FLINT / NF4 / IQ4_NL only at 4 bits); the calibrated
    configurations only for ``calib_methods`` and ``calib_clips`` when given (calibration costs a search)."""
    out = []
    for cal in calibrations:
        for c in (clips if cal == "none" or calib_clips is None else calib_clips):
            for b in bits:
                for m in methods:
                    if (m in FOUR_BIT_ONLY and b != 4) or (m in THREE_BIT_ONLY and b != 3):
                        continue
                    if cal != "none" and calib_methods is not None and m not in calib_methods:
                        continue
                    out.append(BitMoDConfig(bits=b, group_size=group_size, dtype=m, clip=bool(c), calibration=cal))
    return out


def spread(total: int, k: int | None) -> list[int]:
    """``k`` window indices spread evenly over ``total`` (all of them when k is None or >= total)."""
    if k is None or k >= total:
        return list(range(total))
    if k < 1:
        raise ValueError(f"need at least one window, got {k}")
    return sorted(set(torch.linspace(0, total - 1, k).round().long().tolist()))


def kl_sweep(base, tokenizer, texts: dict[str, str], configs_list, *, seq_len: int = 2048, bos="auto",
             max_windows: int | None = None, kl_windows: int | None = 64, calibration_windows=None,
             calibration_sample: int = 512, batch_size: int = 1, model_name: str = "", progress: bool = False,
             log: Callable | None = None, on_config: Callable | None = None,
             cache_reference: bool = False, previous: pd.DataFrame | None = None,
             stop_before: Callable | None = None) -> pd.DataFrame:
    """One row per (configuration, corpus, window): tokens, nll_sum, kl_sum, top1_same, plus the configuration
    and its quantization report. The float model is the first configuration (KL 0 by definition).
    ``on_config(rows so far)`` runs after each configuration (the CLI saves the partial table there, so a run
    cut off by a time limit still returns every configuration it finished). ``cache_reference``: keep the float
    model's logits of the KL windows in memory (seq_len x vocab x 4 bytes each, ~100 MB for SmolLM2 at 512)
    instead of running the float model again beside every configuration (half the forward passes on a CPU).
    A configuration whose quantized weights are provably those of an earlier one (``same_as``: "+clip" of a method
    that searches its own scales, "+act" where the search has nothing to choose) copies that one's rows.
    ``previous``: the per-window rows of an earlier, interrupted run of the same sweep (same model, texts and
    settings: the caller checks); its configurations are taken from there, not recomputed, and any it has beyond
    ``configs_list`` are kept. ``stop_before(cfg, timings)``: called before a configuration is computed, with
    one {"config", "calibration", "quant_seconds", "eval_seconds", "passes"} per configuration computed so far; True stops the
    sweep there (a time budget). ``attrs["remaining"]`` of the result lists the configurations not done."""
    if not texts:
        raise ValueError("texts must name at least one corpus")
    use_bos = E._resolve_bos(tokenizer, bos)
    windows, kl_idx = {}, {}
    for corpus, text in texts.items():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows[corpus], total = E.windows(ids, seq_len, tokenizer.bos_token_id if use_bos else None, max_windows)
        kl_idx[corpus] = spread(len(windows[corpus]), kl_windows)
        if log:
            log(f"{corpus}: {len(windows[corpus])} of {total} windows of {seq_len} tokens, KL on {len(kl_idx[corpus])}")
    stats = None  # activation statistics, collected before the first calibrated configuration that runs
    if any(c.calibration != "none" for c in configs_list) and calibration_windows is None:
        raise ValueError("calibrated configurations need calibration_windows (token ids of calibration text)")
    rows = []
    ref_logits = {corpus: {} for corpus in windows}  # the float model's logits of the KL windows, kept once
    done: dict[str, list] = {}  # config label -> its rows
    earlier = _rows_by_config(previous, {c: len(w) for c, w in windows.items()})
    timings: list[dict] = []
    remaining: list[str] = []
    plan = [None, *configs_list]
    for k, cfg in enumerate(plan):
        label = "float" if cfg is None else cfg.label
        if label in earlier and not (cfg is None and cache_reference):
            rows += earlier[label]
            done[label] = earlier[label]
            if log:
                log(f"{label:>24} from the earlier run")
            continue
        twin = same_as(cfg)
        if twin is not None and twin.label in done:
            new = [{**r, "config": cfg.label, "clip": bool(cfg.clip), "calibration": cfg.calibration}
                   for r in done[twin.label]]
            rows += new
            done[cfg.label] = new
            if log:
                log(f"{cfg.label:>24} same as {twin.label} (provably the same quantized weights)")
            if on_config is not None:
                on_config(pd.DataFrame(rows))
            continue
        if cfg is not None and stop_before is not None and stop_before(cfg, timings):
            remaining = [c.label for c in plan[k:] if c.label not in done]
            break
        if stats is None and cfg is not None and cfg.calibration != "none":
            stats = _calibrate(base, calibration_windows, calibration_sample, configs_list, log)
        first = len(rows)
        start = time.perf_counter()
        if cfg is None:
            model, report = base, None
        else:
            model = copy.deepcopy(base)
            report = quantize_(model, cfg, calibration=stats)
        info = {"config": label, **_report_fields(cfg, report),
                "clip": bool(cfg.clip) if cfg else False, "calibration": cfg.calibration if cfg else "none"}
        quant_wall = time.perf_counter() - start
        eval_seconds = 0.0
        for corpus, win in windows.items():
            start = time.perf_counter()
            if cfg is None:  # the reference itself: KL 0, every argmax the same
                keep = ref_logits[corpus] if cache_reference else None
                sc = E.window_scores(model, win, kl_windows=kl_idx[corpus], batch_size=batch_size,
                                     progress=progress, desc=f"float {corpus}", keep_logits=keep)
                for i in kl_idx[corpus]:
                    sc.kl_sum[i], sc.top1_same[i] = 0.0, float(sc.tokens[i])
            else:
                ref = ref_logits[corpus] if cache_reference else base
                sc = E.window_scores(model, win, reference=ref, kl_windows=kl_idx[corpus], batch_size=batch_size,
                                     progress=progress, desc=f"{cfg.label} {corpus}")
            seconds = time.perf_counter() - start
            eval_seconds += seconds
            for w in range(len(win)):
                rows.append({"model": model_name, "corpus": corpus, **info, "window": w,
                             "tokens": int(sc.tokens[w]), "nll_sum": float(sc.nll_sum[w]),
                             "kl_sum": float(sc.kl_sum[w]), "top1_same": float(sc.top1_same[w])})
            if log:
                n, k_ = sc.tokens.sum().item(), sc.kl_sum.nan_to_num(0).sum().item()
                kt = sc.tokens[kl_idx[corpus]].sum().item()
                log(f"{info['config']:>24} {corpus:>10} ppl {math.exp(sc.nll_sum.sum().item() / n):8.3f} "
                    f"KL {k_ / kt:.5f} ({seconds:.1f} s, quant {info['quant_seconds']:.1f} s)")
        if label in earlier:  # the float model rerun only for its cached logits: keep the earlier rows
            del rows[first:]
            rows += earlier[label]
        done[label] = rows[first:]
        if cfg is not None:
            timings.append({"config": label, "calibration": cfg.calibration, "quant_seconds": quant_wall,
                            "eval_seconds": eval_seconds, "passes": search_passes(cfg)})
            del model
        if on_config is not None:
            on_config(pd.DataFrame(rows))
    for label, r in earlier.items():  # the earlier run's configurations beyond this plan stay in the table
        if label not in done:
            rows += r
            done[label] = r
    out = pd.DataFrame(rows)
    out.attrs["remaining"] = [c for c in remaining if c not in done]
    return out


def _calibrate(base, calibration_windows, calibration_sample, configs_list, log):
    """Activation statistics for the calibrated configurations (once per sweep, before the first of them)."""
    if calibration_windows is None:
        raise ValueError("calibrated configurations need calibration_windows (token ids of calibration text)")
    from .calibrate import collect_activation_stats

    start = time.perf_counter()
    stats = collect_activation_stats(base, calibration_windows, sample_tokens=calibration_sample,
                                     hessian=any(c.calibration == "gptq" for c in configs_list))
    if log:
        log(f"calibration: {calibration_windows.numel()} tokens, {time.perf_counter() - start:.1f} s")
    return stats


def _rows_by_config(previous: pd.DataFrame | None, n_windows: dict[str, int]) -> dict[str, list]:
    """An earlier run's rows per configuration, only the configurations it finished on every corpus."""
    if previous is None or previous.empty:
        return {}
    out = {}
    for label, g in previous.groupby("config", sort=False):
        counts = g.groupby("corpus").window.nunique().to_dict()
        if counts == n_windows and len(g) == sum(n_windows.values()):
            out[label] = g.to_dict("records")
    return out


def same_as(cfg):
    """The configuration whose quantized weights are provably the same as ``cfg``'s (None when there is none):
    without "+clip" where the method searches its own scales (``quantize.clip_ignored``), then without "+act"
    where the per-group search has nothing to choose (``quantize.calibration_ignored``)."""
    if cfg is None:
        return None
    from dataclasses import replace

    twin = cfg
    if twin.clip and clip_ignored(twin.dtype, twin.bits):
        twin = replace(twin, clip=False)
    if twin.calibration == "act" and calibration_ignored(twin.dtype, twin.bits, twin.clip):
        twin = replace(twin, calibration="none")
    return None if twin == cfg else twin


def search_passes(cfg) -> int:
    """Passes over the weights that quantizing with ``cfg`` costs, for the time budget's estimate: candidate
    types x scale ratios, plus AWQ's round-to-nearest scale search (20 alphas)."""
    from .quantize import AWQ_ALPHAS, CLIP_RATIOS, _candidates

    candidates, own = _candidates(cfg.dtype, cfg.bits, 1.0)
    n = len(candidates) * len(own or (CLIP_RATIOS if cfg.clip else (1.0,)))
    if cfg.calibration == "awq":
        n += len(AWQ_ALPHAS) * len(candidates) * len(own or (1.0,))
    return n


def _boot_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    a = (1 - level) / 2
    return float(np.quantile(samples, a)), float(np.quantile(samples, 1 - a))


def _setting_frames(windows_df: pd.DataFrame):
    """(setting key, {config: per-window frame sorted by window}) for every model x corpus."""
    for key, df in windows_df.groupby(["model", "corpus"], sort=False):
        yield key, {c: g.sort_values("window") for c, g in df.groupby("config", sort=False)}


def summarize(windows_df: pd.DataFrame, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Per model x corpus x configuration: perplexity over all windows and mean per-token KL over the KL
    windows, each with a percentile bootstrap interval over windows; top-1 agreement with the float model."""
    rows = []
    for (model, corpus), frames in _setting_frames(windows_df):
        n = len(next(iter(frames.values())))
        idx = _boot_idx(n, n_boot, seed)
        for config, g in frames.items():
            if len(g) != n:
                raise ValueError(f"{model} {corpus}: {config} has {len(g)} windows, others {n}")
            tok, nll = g.tokens.to_numpy(float), g.nll_sum.to_numpy()
            kl_mask = ~np.isnan(g.kl_sum.to_numpy())
            kl, top1 = np.nan_to_num(g.kl_sum.to_numpy()), np.nan_to_num(g.top1_same.to_numpy())
            ktok = tok * kl_mask
            boot_ppl = np.exp(nll[idx].sum(1) / tok[idx].sum(1))
            with np.errstate(invalid="ignore", divide="ignore"):
                boot_kl = kl[idx].sum(1) / ktok[idx].sum(1)
            first = g.iloc[0]
            rows.append({"model": model, "corpus": corpus, "config": config,
                         **{k: first[k] for k in ("dtype", "bits", "clip", "calibration", "group_size",
                                                  "bits_per_weight", "weight_mse", "quant_seconds")},
                         "ppl": math.exp(nll.sum() / tok.sum()), **dict(zip(("ppl_lo", "ppl_hi"), _interval(boot_ppl, level))),
                         "kl": kl.sum() / ktok.sum(), **dict(zip(("kl_lo", "kl_hi"), _interval(boot_kl[~np.isnan(boot_kl)], level))),
                         "top1_agreement": top1.sum() / ktok.sum(), "windows": n, "kl_windows": int(kl_mask.sum()),
                         "tokens": int(tok.sum()), "kl_tokens": int(ktok.sum())})
    return pd.DataFrame(rows)


def paired(frames: dict, a: str, b: str, idx: np.ndarray, level: float = 0.95) -> dict:
    """Config ``a`` against ``b`` on the same windows: perplexity ratio a/b and KL difference a - b, each with
    its paired bootstrap interval, and which way each interval decides (">" a worse, "<" a better, "~" neither)."""
    ga, gb = frames[a], frames[b]
    if not np.array_equal(ga.window.to_numpy(), gb.window.to_numpy()):
        raise ValueError(f"{a} and {b} were not scored on the same windows")
    tok = ga.tokens.to_numpy(float)
    na, nb = ga.nll_sum.to_numpy(), gb.nll_sum.to_numpy()
    ratio = math.exp((na.sum() - nb.sum()) / tok.sum())
    boot = np.exp((na[idx].sum(1) - nb[idx].sum(1)) / tok[idx].sum(1))
    lo, hi = _interval(boot, level)
    ka, kb = ga.kl_sum.to_numpy(), gb.kl_sum.to_numpy()
    m = ~(np.isnan(ka) | np.isnan(kb))
    ktok = tok * m
    ka, kb = np.nan_to_num(ka), np.nan_to_num(kb)
    diff = (ka.sum() - kb.sum()) / ktok.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        kboot = (ka[idx].sum(1) - kb[idx].sum(1)) / ktok[idx].sum(1)
    klo, khi = _interval(kboot[~np.isnan(kboot)], level)
    verdict = lambda lo_, hi_, null: ">" if lo_ > null else "<" if hi_ < null else "~"  # noqa: E731
    return {"a": a, "b": b, "ppl_ratio": ratio, "ppl_ratio_lo": lo, "ppl_ratio_hi": hi,
            "ppl_verdict": verdict(lo, hi, 1.0), "kl_diff": diff, "kl_diff_lo": klo, "kl_diff_hi": khi,
            "kl_verdict": verdict(klo, khi, 0.0)}


# The paper's orderings: (worse, better) pairs within a setting (same bits, clipping and calibration).
ORDERINGS = (("ant", "bitmod"), ("olive", "ant"), ("olive", "bitmod"), ("int_asym", "bitmod"), ("nf4", "bitmod"),
             ("iq4_nl", "bitmod"), ("q4_k", "bitmod"), ("q3_k", "bitmod"),
             ("mxfp", "bitmod"), ("nvfp", "bitmod"), ("bitmod", "float"))


def orderings(windows_df: pd.DataFrame, pairs=ORDERINGS, n_boot: int = 2000, seed: int = 0,
              level: float = 0.95) -> pd.DataFrame:
    """Every pair of ``pairs`` in every setting (model, corpus, bits, clip, calibration) that holds both, plus
    each method with clipping against itself without, and calibrated against round to nearest."""
    rows = []
    for (model, corpus), frames in _setting_frames(windows_df):
        n = len(next(iter(frames.values())))
        idx = _boot_idx(n, n_boot, seed)
        meta = {c: g.iloc[0] for c, g in frames.items()}
        by_setting: dict = {}
        for c, r in meta.items():
            if c != "float":
                by_setting.setdefault((int(r["bits"]), bool(r["clip"]), r["calibration"]), {})[r["dtype"]] = c
        for (bits, clip, cal), cfgs in sorted(by_setting.items()):
            for a, b in pairs:
                ca = cfgs.get(a)
                cb = "float" if b == "float" and "float" in frames else cfgs.get(b)
                if ca and cb:
                    rows.append({"model": model, "corpus": corpus, "bits": bits, "clip": clip, "calibration": cal,
                                 "comparison": f"{a} vs {b}", **paired(frames, ca, cb, idx, level)})
            for d, c in cfgs.items():  # each option against the same method without it
                against = []
                if clip:
                    against.append((by_setting.get((bits, False, cal), {}).get(d), "clip vs none"))
                if cal != "none":
                    against.append((by_setting.get((bits, clip, "none"), {}).get(d), f"{cal} vs none"))
                for base, what in against:
                    if base:
                        rows.append({"model": model, "corpus": corpus, "bits": bits, "clip": clip, "calibration": cal,
                                     "comparison": f"{d}: {what}", **paired(frames, c, base, idx, level)})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- the scorecard
def _model_size(name: str) -> str:
    """'a 135M model' / 'a 1.8B model' from effllm_lib.models' record of the packaged model (not a guess)."""
    from ..models import MODELS

    if name not in MODELS:
        return "a model"
    n = MODELS[name].params
    return f"a {n / 1e9:.1f}B model" if n >= 1e9 else f"a {n / 1e6:.0f}M model"


def _windows_note(orderings_df: pd.DataFrame) -> str:
    """', 12 of 4115 windows of 512 tokens' from the orderings file's provenance (empty when unknown)."""
    meta = orderings_df.attrs.get("provenance", {}).get("params", {})
    n = meta.get("windows")
    return "" if not n else f", {n} windows of {meta.get('seq_len')} tokens ({meta.get('tokens')} tokens)"


# Paper ratios derived from the published round-to-nearest perplexities (papers.md): Llama-2-7B and Phi-2.
def claim_rows(ppl: pd.DataFrame | None = None, synthetic: pd.DataFrame | None = None,
               zero_shot: pd.DataFrame | None = None, model: str = "smollm2-135m",
               corpus: str = "wikipedia", orderings_df: pd.DataFrame | None = None,
               zero_shot_model: str | None = None) -> pd.DataFrame:
    """Scorecard rows (claim_id, ours, status, reason; ours_lo / ours_hi / stand_in where measured with
    intervals) from our measured tables. ``orderings_df`` (``orderings`` of a KL sweep) gives the ratio claims
    with their paired intervals, from the round-to-nearest setting (no clipping, no calibration) that the
    paper's ratios describe; otherwise ``ppl`` (the older per-configuration sweep) gives point values.
    ``zero_shot_model``: the model whose zero-shot table gives the discriminative-loss claim (default ``model``)."""
    rows = []
    for pid in ("llama2_7b", "llama3_8b"):
        for what in ("fp16", "w4_awq", "w3_awq"):
            for c in ("wikitext2", "c4"):
                rows.append({"claim_id": f"acc_ppl_{pid}_{what}_{c}", "ours": float("nan"),
                             "status": "not_reproducible",
                             "reason": "Llama-2/3 weights and WikiText-2/C4 are not available offline (no model "
                                       "hub). Calibrated quantization (activation weighting, AWQ, GPTQ) and "
                                       "llama.cpp k-quants on our models: accuracy_smollm2-135m. See the ratio "
                                       "claims on our models."})
    for pid, name in (("llama2_7b", "Llama-2-7B"), ("phi2", "Phi-2")):
        for m in ("bitmod", "ant", "olive"):
            for b in (3, 4):
                rows.append({"claim_id": f"acc_rtn_{pid}_{m}_w{b}_wikitext2", "ours": float("nan"),
                             "status": "not_reproducible",
                             "reason": f"{name} weights are not available offline; the same comparison on "
                                       f"{model} is in the acc_ratio_* claims"})
    rows.append({"claim_id": "acc_rtn_phi2_fp16_wikitext2", "ours": float("nan"), "status": "not_reproducible",
                 "reason": "Phi-2 weights are not available offline"})
    if orderings_df is not None:
        o = orderings_df[(orderings_df.model == model) & (orderings_df.corpus == corpus) & ~orderings_df["clip"]
                         & (orderings_df.calibration == "none")].set_index(["comparison", "bits"])
        n_win = _windows_note(orderings_df)
        for b in (3, 4):
            for claim, comp in (("ant_over_bitmod", "ant vs bitmod"), ("olive_over_ant", "olive vs ant"),
                                ("bitmod_over_float", "bitmod vs float")):
                if (comp, b) not in o.index:
                    continue
                r = o.loc[(comp, b)]
                rows.append({"claim_id": f"acc_ratio_{claim}_w{b}", "ours": r.ppl_ratio, "ours_lo": r.ppl_ratio_lo,
                             "ours_hi": r.ppl_ratio_hi, "status": "measured",
                             "stand_in": f"{model} ({_model_size(model)}, float = its dequantized 4-bit GGUF) on "
                                         f"English Wikipedia{n_win}",
                             "reason": f"round to nearest, group 128; paired bootstrap over windows; KL difference "
                                       f"{r.kl_diff:+.4f} nats/token [{r.kl_diff_lo:+.4f}, {r.kl_diff_hi:+.4f}]"})
    elif ppl is not None:
        p = ppl[(ppl.model == model) & (ppl.corpus == corpus)].set_index(["dtype", "bits"]).ppl
        fp = p["float", 16]
        for b in (3, 4):
            rows.append({"claim_id": f"acc_ratio_ant_over_bitmod_w{b}", "ours": p["ant", b] / p["bitmod", b],
                         "status": "measured", "reason": f"{model}, {corpus} text, RTN, group 128"})
            rows.append({"claim_id": f"acc_ratio_olive_over_ant_w{b}", "ours": p["olive", b] / p["ant", b],
                         "status": "measured", "reason": f"{model}, {corpus} text, RTN, group 128"})
            rows.append({"claim_id": f"acc_ratio_bitmod_over_float_w{b}", "ours": p["bitmod", b] / fp,
                         "status": "measured",
                         "reason": f"{model} ({_model_size(model)} whose float reference is itself a 4-bit "
                                   "GGUF) vs Llama-2-7B in the paper"})
    if synthetic is not None:
        s = synthetic.set_index(["distribution", "bits", "dtype"]).relative_mse
        for dist, key in (("gaussian", "gauss"), ("laplace", "laplace"), ("student_t3", "t3")):
            for b in (3, 4):
                rows.append({"claim_id": f"acc_synthetic_mse_{key}_w{b}", "ours": s[dist, b, "bitmod"],
                             "status": "measured", "reason": "4096 i.i.d. groups of 128, seed 0"})
    if zero_shot is not None:
        zs_model = zero_shot_model or model
        loss = accuracy_loss(zero_shot)
        loss = loss[loss.model == zs_model]
        rows.append({"claim_id": "acc_discriminative_loss_w4", "ours": float(loss.loss_pp.mean()),
                     "status": "measured",
                     "reason": f"{zs_model}: mean over {len(loss)} zero-shot BIG-bench multiple-choice tasks "
                               f"({', '.join(loss.task)}; {int(loss.n.sum())} questions)"})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------- files-only entry point
def load_gguf(gguf: str | Path, tokenizer_dir: str | Path | None = None, device: str = "cpu"):
    """(float model, tokenizer) from a GGUF file (dequantized by transformers) and a tokenizer folder, or the
    GGUF's own tokenizer when ``tokenizer_dir`` is None (what ``effllm_lib.models`` builds its folders from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = (AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name) if tokenizer_dir is None
                 else AutoTokenizer.from_pretrained(tokenizer_dir))
    # Gemma is trained with BOS at the start of every sequence. transformers 5.17's conversion of Gemma-3's
    # GGUF tokenizer added no BOS and split the text into twice as many tokens (perplexity 153 instead of 22
    # on our Wikipedia text): refuse such a tokenizer instead of reporting its numbers.
    if str(getattr(model.config, "model_type", "")).startswith("gemma") and not E.tokenizer_adds_bos(tokenizer):
        raise ValueError(f"the tokenizer for {gguf.name} adds no BOS token, which Gemma needs; pass the model's "
                         "tokenizer folder with --tokenizer (e.g. one saved by effllm_lib.models.load_causal_lm)")
    return model.to(device).eval(), tokenizer


def _merge_windows(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-window tables of several runs (e.g. one device call per bit width) as one; the float model, scored
    by every run, is kept once."""
    df = pd.concat(frames, ignore_index=True)
    df = df.drop_duplicates(["model", "corpus", "config", "window"], keep="first").reset_index(drop=True)
    return _with_no_op_clip_rows(df)


def _with_no_op_clip_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Add the "+clip" rows of OliVe / IQ4_NL (copies of the rows without clip, as ``kl_sweep`` makes them:
    they search their own scales, so the clipping option changes nothing) wherever other clipped
    configurations of the same model, corpus, bits and calibration exist but these copies are missing (e.g.
    the runs were split so that another call measured the clipped configurations)."""
    add = []
    clipped = df[df["clip"].astype(bool)]
    have_clip = set(zip(clipped.model, clipped.corpus, clipped.bits, clipped.calibration))
    for (model, corpus, config), g in df[~df["clip"].astype(bool)].groupby(["model", "corpus", "config"], sort=False):
        r = g.iloc[0]
        if (r["dtype"] == "float" or (model, corpus, r.bits, r.calibration) not in have_clip
                or not clip_ignored(r["dtype"], int(r.bits))):
            continue
        twin = BitMoDConfig(bits=int(r.bits), group_size=int(r.group_size), dtype=r["dtype"], clip=True,
                            calibration=r.calibration).label
        if not ((df.model == model) & (df.corpus == corpus) & (df.config == twin)).any():
            add.append(g.assign(config=twin, clip=True))
    return pd.concat([df, *add], ignore_index=True) if add else df


def _run_params(frames: list[pd.DataFrame], df: pd.DataFrame) -> dict:
    """What a merged table was measured on: windows, predicted tokens, window length, clipping, calibration."""
    src = [f.attrs.get("provenance", {}).get("params", {}) for f in frames]
    fl = df[df.config == "float"]
    return {"models": sorted(df.model.unique()), "windows": int(fl.groupby(["model", "corpus"]).size().max()),
            "tokens": int(fl.groupby(["model", "corpus"]).tokens.sum().max()),
            "seq_len": next((p["seq_len"] for p in src if p.get("seq_len")), None),
            "clip": sorted({bool(c) for c in df["clip"]}), "calibration": sorted(df.calibration.unique()),
            "configs": list(dict.fromkeys(df.config))}


CLAIMS_FROM = {"orderings": "orderings_smollm2-135m", "synthetic": "synthetic_mse",
               "zero_shot": "zeroshot_qwen2.5-1.5b"}


def write_claims(model: str = "smollm2-135m", zero_shot_model: str = "qwen2.5-1.5b", scale: str = "full",
                 out: Path | None = None) -> pd.DataFrame:
    """accuracy_claims (the scorecard rows) from the committed orderings, synthetic and zero-shot files."""
    from .. import results

    names = {"orderings": f"orderings_{model}", "synthetic": "synthetic_mse",
             "zero_shot": f"zeroshot_{zero_shot_model}"}
    tables = {k: results.load("bitmod", v) for k, v in names.items()}
    claims = claim_rows(synthetic=tables["synthetic"], zero_shot=tables["zero_shot"], model=model,
                        orderings_df=tables["orderings"], zero_shot_model=zero_shot_model)
    results.save(claims, "bitmod", "accuracy_claims", scale=scale,
                 params={"model": model, "corpus": "wikipedia", "zero_shot_model": zero_shot_model,
                         "from": list(names.values())},
                 **({"path": Path(out) / "accuracy_claims.csv"} if out else {}))
    return claims


# CLI options that say how one call runs, not what the sweep measures (left out of the results' params)
PER_CALL = ("resume", "max_minutes", "max_configs", "reserve_seconds")
# params that must match for --resume to continue a windows file: the same model weights, texts and settings
RESUME_KEYS = ("model", "model_sha256", "texts_sha256", "seq_len_used", "max_windows", "kl_windows", "batch_size",
               "calib_text_sha256", "calib_windows", "calib_seq_len", "calib_sample", "matmul_precision", "device",
               "scale", "cache_reference", "tag")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def model_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes and bytes): two calls are the same sweep only if the
    float model's weights are bit for bit the same (e.g. a retrained model)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _previous_windows(path: Path, params: dict) -> pd.DataFrame | None:
    """The windows file of an earlier call of the same sweep (None when there is none); a file from another model,
    text or setting is an error naming what differs, never silently mixed in."""
    from .. import results

    if not path.is_file():
        print(f"effllm: --resume: no {path.name} yet, starting afresh", flush=True)
        return None
    df = results.read(path)
    old = df.attrs["provenance"]["params"]
    differ = [k for k in RESUME_KEYS if json.dumps(old.get(k), sort_keys=True) != json.dumps(params.get(k), sort_keys=True)]
    if differ:
        raise ValueError(f"--resume: {path} was written by another sweep ({', '.join(differ)} differ, e.g. "
                         f"{differ[0]}: {old.get(differ[0])!r} there, {params.get(differ[0])!r} now); use another "
                         "--out or --tag, or drop --resume to start afresh")
    done = list(dict.fromkeys(df.config))
    print(f"effllm: --resume: {len(done)} configurations in {path.name}: {', '.join(done)}", flush=True)
    return df


class _Budget:
    """``stop_before`` for ``kl_sweep``: stop before a configuration whose estimated time (its quantization passes
    times the slowest seconds per pass seen so far in its calibration family, plus the slowest evaluation, plus
    a minute for the first AWQ or GPTQ configuration)
    would end past ``max_minutes`` less ``reserve_seconds``; or after ``max_configs`` computed ones. The first
    configuration of a call always runs (else a long one could never be done)."""

    UNSEEN_SECONDS = 60.0  # added for the first configuration of a calibration (AWQ, GPTQ) not yet timed
    GPTQ_LOOP_PASSES = 20  # GPTQ's per-column loop, in passes of the group search (a guess; only scales estimates)

    def __init__(self, start: float, max_minutes: float | None, max_configs: int | None, reserve_seconds: float,
                 log: Callable | None = None):
        if max_minutes is not None and max_minutes <= 0:
            raise ValueError(f"--max-minutes must be positive, got {max_minutes}")
        if max_configs is not None and max_configs < 1:
            raise ValueError(f"--max-configs must be at least 1, got {max_configs}")
        self.start, self.max_minutes, self.max_configs = start, max_minutes, max_configs
        self.reserve, self.log = reserve_seconds, log

    def estimate(self, cfg, timings: list[dict]) -> float:
        family = lambda c: c if c in ("awq", "gptq") else "rtn"  # noqa: E731 - act costs what none costs
        same = [t for t in timings if family(t["calibration"]) == family(cfg.calibration)]
        # seconds = rate x (passes + k): GPTQ's column loop costs about as much whatever the type (k passes' worth)
        k = self.GPTQ_LOOP_PASSES if cfg.calibration == "gptq" else 0
        quant = max(t["quant_seconds"] * (search_passes(cfg) + k) / (max(t["passes"], 1) + k) for t in (same or timings))
        # the first AWQ / GPTQ configuration: its search (AWQ's matmuls, GPTQ's column loop) is not in the passes
        unseen = self.UNSEEN_SECONDS if not same and family(cfg.calibration) != "rtn" else 0.0
        return quant + max(t["eval_seconds"] for t in timings) + unseen

    def __call__(self, cfg, timings: list[dict]) -> bool:
        if not timings:  # kl_sweep times the quantized configurations only: the first one always runs
            return False
        if self.max_configs is not None and len(timings) >= self.max_configs:
            if self.log:
                self.log(f"effllm: stopping before {cfg.label}: --max-configs {self.max_configs} done")
            return True
        if self.max_minutes is None:
            return False
        elapsed = time.perf_counter() - self.start
        need = self.estimate(cfg, timings)
        left = 60 * self.max_minutes - self.reserve - elapsed
        if need > left:
            if self.log:
                self.log(f"effllm: stopping before {cfg.label}: it needs about {need:.0f} s, {max(left, 0):.0f} s "
                         f"of --max-minutes {self.max_minutes} left")
            return True
        return False


def _load_model(args):
    if args.model_dir:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).to(args.device).eval()
        return model, AutoTokenizer.from_pretrained(args.tokenizer or args.model_dir)
    return load_gguf(args.gguf, args.tokenizer, args.device)


def main(argv=None) -> int:
    from .. import results
    from .quantize import CALIBRATIONS, relative_mse_table

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Primary output (--what kl): windows_<model><tag>.csv (per configuration and window: NLL, KL from "
               "the float model, top-1 agreement), accuracy_<model><tag>.csv (perplexity and KL with bootstrap "
               "intervals) and orderings_<model><tag>.csv (paired comparisons). --summarize merges the windows "
               "files of several runs into one accuracy / orderings pair.")
    ap.add_argument("--model", help="name recorded in the results (e.g. smollm2-135m)")
    ap.add_argument("--gguf", help="GGUF file of the float model (dequantized by transformers)")
    ap.add_argument("--model-dir", help="or: a transformers model folder (e.g. one written by effllm_lib.train_lm)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the GGUF's / model folder's own)")
    ap.add_argument("--text", action="append", default=[], help="corpus=path.txt (repeatable)")
    ap.add_argument("--calib-text", help="calibration text for --calibration act / awq / gptq (not the evaluation "
                                         "text)")
    ap.add_argument("--calib-windows", type=int, default=64, help="calibration windows (default 64)")
    ap.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length (default 512)")
    ap.add_argument("--calib-sample", type=int, default=512, help="input rows kept per layer for AWQ's search")
    ap.add_argument("--tasks-dir", help="folder of BIG-bench <task>/task.json files for zero-shot")
    ap.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: all)")
    ap.add_argument("--kl-windows", type=int, default=64, help="windows (spread over the text) that get the KL")
    ap.add_argument("--max-examples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None, help="default: 2048 or the model's maximum")
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    ap.add_argument("--out", required=True, help="folder for the results files")
    ap.add_argument("--tag", default="", help="suffix of the results files (e.g. w3 for one device call)")
    ap.add_argument("--scale", choices=("ci", "full"), default="full", help="results.save scale")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                    help="float32 matmuls: 'high' allows TF32 on the GPU (float and quantized models alike)")
    ap.add_argument("--what", default="kl", help="comma-separated: kl (primary), ppl (old table), zeroshot, "
                                                 "synthetic")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated data types")
    ap.add_argument("--bits", default="3,4", help="bit widths")
    ap.add_argument("--clip", default="0,1", help="clipping search off (0) / on (1), comma-separated")
    ap.add_argument("--calibration", default="none", help=f"comma-separated, of {', '.join(CALIBRATIONS)}")
    ap.add_argument("--calib-methods", default=None, help="methods that get the calibrated configurations "
                                                             "(default: all of --methods)")
    ap.add_argument("--calib-clip", default=None, help="clipping settings of the calibrated configurations "
                                                        "(default: those of --clip)")
    ap.add_argument("--cache-reference", action="store_true",
                    help="keep the float model's logits of the KL windows in memory instead of a second forward "
                         "pass per configuration (~100 MB per 512-token window of a 49k vocabulary)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the windows file already in --out (same model weights, texts and settings, else "
                         "an error): its configurations are kept, not recomputed; without one, start afresh")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="time budget from the start of this call: before each configuration, stop (saving the "
                         "partial tables) when its estimated time would not fit; continue later with --resume")
    ap.add_argument("--max-configs", type=int, default=None,
                    help="compute at most this many configurations in this call (then stop as --max-minutes does)")
    ap.add_argument("--reserve-seconds", type=float, default=30.0,
                    help="of --max-minutes, kept for the final summary and saving (default 30)")
    ap.add_argument("--zero-shot-bits", default="4,3", help="bit widths of the zero-shot sweep")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples")
    ap.add_argument("--summarize", nargs="+", metavar="WINDOWS_CSV", help="only merge these windows files")
    ap.add_argument("--claims", action="store_true", help="only write accuracy_claims (the scorecard rows) from the "
                                                          f"committed {', '.join(CLAIMS_FROM.values())}")
    args = ap.parse_args(argv)
    call_start = time.perf_counter()
    if args.claims:
        print(write_claims(scale=args.scale, out=Path(args.out)).to_string(), flush=True)
        return 0
    out = Path(args.out)
    tag = f"_{args.tag}" if args.tag else ""
    extra = {"library_fingerprint": __import__("effllm_lib.paths", fromlist=["x"]).library_fingerprint()}
    if args.summarize:
        frames = [results.read(p) for p in args.summarize]
        df = _merge_windows(frames)
        models = sorted(df.model.unique())
        name = models[0] if len(models) == 1 else "all"
        partial = [Path(p).name for p, f in zip(args.summarize, frames)
                   if f.attrs.get("provenance", {}).get("params", {}).get("complete") is False]
        params = {"files": [Path(p).name for p in args.summarize], "n_boot": args.n_boot, **_run_params(frames, df),
                  "complete": not partial}
        s = summarize(df, n_boot=args.n_boot)
        o = orderings(df, n_boot=args.n_boot) if not partial else pd.DataFrame()
        if partial:  # the paper's comparisons only from finished sweeps
            print(f"effllm: {', '.join(partial)} partial (complete: false): no orderings file", flush=True)
        results.save(s, "bitmod", f"accuracy_{name}{tag}", params=params, scale=args.scale, extra=extra,
                     path=out / f"accuracy_{name}{tag}.csv")
        if not o.empty:
            results.save(o, "bitmod", f"orderings_{name}{tag}", params=params, scale=args.scale, extra=extra,
                         path=out / f"orderings_{name}{tag}.csv")
        print(s[["model", "config", "bits_per_weight", "ppl", "ppl_lo", "ppl_hi", "kl", "kl_lo", "kl_hi"]].to_string())
        return 0
    if not args.model or not (args.gguf or args.model_dir):
        ap.error("--model and one of --gguf / --model-dir are required (or --summarize)")
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    calibrations = tuple(c for c in args.calibration.split(",") if c)
    if not calibrations or set(calibrations) - set(CALIBRATIONS):
        ap.error(f"--calibration takes some of {', '.join(CALIBRATIONS)}, got {args.calibration!r}")
    clips = tuple(sorted({bool(int(c)) for c in args.clip.split(",") if c}))
    bits = tuple(int(b) for b in args.bits.split(","))
    # every input file is checked before the (slow) model load, so a typo fails in a second, not a minute
    if args.gguf and not Path(args.gguf).is_file():
        raise FileNotFoundError(f"no GGUF file at {args.gguf}")
    if args.model_dir and not (Path(args.model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no transformers model (config.json) in {args.model_dir}")
    for spec in args.text:
        if "=" not in spec or not Path(spec.split("=", 1)[1]).is_file():
            raise FileNotFoundError(f"--text wants name=path to an existing text file, got {spec!r}")
    if set(calibrations) - {"none"} and not (args.calib_text and Path(args.calib_text).is_file()):
        raise FileNotFoundError(f"--calibration {args.calibration} needs --calib-text pointing at a text file")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = args.matmul_precision == "high"
        torch.backends.cudnn.allow_tf32 = args.matmul_precision == "high"
    torch.set_float32_matmul_precision(args.matmul_precision)
    load = lambda: _load_model(args)  # noqa: E731
    what = set(args.what.split(","))
    params = {k: v for k, v in vars(args).items() if k not in ("out", "summarize", *PER_CALL)}
    texts = {}
    for spec in args.text:
        name, path = spec.split("=", 1)
        texts[name] = Path(path).read_text()
    if "kl" in what:
        base, tok = load()
        seq_len = args.seq_len or E.model_max_length(base)
        calib = None
        calib_text = Path(args.calib_text).read_text() if args.calib_text else ""
        if set(calibrations) - {"none"}:
            ids = tok(calib_text, add_special_tokens=False)["input_ids"]
            use_bos = E._resolve_bos(tok, "auto")
            calib, _ = E.windows(ids, args.calib_seq_len, tok.bos_token_id if use_bos else None, args.calib_windows)
        calib_methods = tuple(args.calib_methods.split(",")) if args.calib_methods else None
        calib_clips = (tuple(sorted({bool(int(c)) for c in args.calib_clip.split(",") if c}))
                       if args.calib_clip else None)
        cfgs = sweep_configs(methods, bits, clips, calibrations, calib_methods=calib_methods, calib_clips=calib_clips)
        # what makes two calls the same sweep: the model's weights, the texts, every evaluation setting
        identity = {"model_sha256": model_sha256(base), "seq_len_used": seq_len,
                    "texts_sha256": {k: _sha256(v) for k, v in texts.items()},
                    "calib_text_sha256": _sha256(calib_text) if calib is not None else None}
        params = {**params, **identity}
        print(f"effllm: float model sha256 {identity['model_sha256']}", flush=True)
        windows_path = out / f"windows_{args.model}{tag}.csv"
        previous = _previous_windows(windows_path, params) if args.resume else None
        planned = ["float", *(c.label for c in cfgs)]

        def run_params(df):
            labels = list(dict.fromkeys(df.config))
            return {**params, "configs_planned": planned, "configs_done": labels,
                    "complete": all(c in labels for c in planned)}

        def save_windows(df):
            results.save(df, "bitmod", f"windows_{args.model}{tag}", params=run_params(df), scale=args.scale,
                         extra=extra, path=windows_path)

        budget = _Budget(call_start, args.max_minutes, args.max_configs, args.reserve_seconds,
                         log=lambda m: print(m, flush=True))
        df = kl_sweep(base, tok, texts, cfgs, seq_len=seq_len, cache_reference=args.cache_reference,
                      max_windows=args.max_windows, kl_windows=args.kl_windows, calibration_windows=calib,
                      calibration_sample=args.calib_sample, batch_size=args.batch_size, model_name=args.model,
                      log=lambda m: print(m, flush=True), on_config=save_windows, previous=previous,
                      stop_before=budget)
        remaining = df.attrs.get("remaining", [])
        save_windows(df)
        p = run_params(df)
        s = summarize(df, n_boot=args.n_boot)
        results.save(s, "bitmod", f"accuracy_{args.model}{tag}", params=p, scale=args.scale, extra=extra,
                     path=out / f"accuracy_{args.model}{tag}.csv")
        if not p["complete"]:  # the paper's comparisons only from a finished sweep
            print(f"effllm: partial sweep, {len(p['configs_done'])} of {len(planned)} configurations done; "
                  f"not done: {', '.join(remaining)}. No orderings file; continue with the same command and "
                  f"--resume", flush=True)
        else:
            o = orderings(df, n_boot=args.n_boot)
            if o.empty:  # e.g. a run of baselines alone: their comparisons come when --summarize merges runs
                print("no paper comparison within this run's configurations: no orderings file", flush=True)
            else:
                results.save(o, "bitmod", f"orderings_{args.model}{tag}", params=p, scale=args.scale, extra=extra,
                             path=out / f"orderings_{args.model}{tag}.csv")
        print(s[["corpus", "config", "bits_per_weight", "ppl", "ppl_lo", "ppl_hi", "kl", "kl_lo", "kl_hi"]]
              .to_string(), flush=True)
        print(f"effllm: {'complete' if p['complete'] else 'PARTIAL'} after {time.perf_counter() - call_start:.0f} s",
              flush=True)
        del base
    if "ppl" in what:
        df = perplexity_sweep(load, texts, methods=methods, bits=bits, seq_len=args.seq_len,
                              max_windows=args.max_windows, model_name=args.model, progress=False,
                              log=lambda m: print(m, flush=True))
        results.save(df, "bitmod", f"perplexity_{args.model}{tag}", params=params, scale=args.scale, extra=extra,
                     path=out / f"perplexity_{args.model}{tag}.csv")
        print(df[["corpus", "dtype", "bits", "bits_per_weight", "ppl"]].to_string(), flush=True)
    if "zeroshot" in what and args.tasks_dir:
        tasks = {t: E.bigbench_multiple_choice(json.loads((Path(args.tasks_dir) / t / "task.json").read_text()),
                                               args.max_examples, seed=0) for t in ZERO_SHOT_TASKS}
        df = zero_shot_sweep(load, tasks, bits=tuple(int(b) for b in args.zero_shot_bits.split(",")),
                             model_name=args.model, progress=False, log=lambda m: print(m, flush=True))
        results.save(df, "bitmod", f"zeroshot_{args.model}{tag}", params=params, scale=args.scale, extra=extra,
                     path=out / f"zeroshot_{args.model}{tag}.csv")
        print(df[["task", "dtype", "bits", "accuracy", "chance"]].to_string(), flush=True)
    if "synthetic" in what:
        df = relative_mse_table()
        results.save(df, "bitmod", "synthetic_mse", params={"n_groups": 4096, "group_size": 128, "seed": 0},
                     scale=args.scale, extra=extra, path=out / "synthetic_mse.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
