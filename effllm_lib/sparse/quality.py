"""What pruning costs in quality: perplexity of the packaged models by weight sparsity, magnitude vs Wanda.

    df = pruning_perplexity(["smollm2-135m"], sparsities=[0.0, 0.5, 0.7], methods=["magnitude", "wanda"])
    python -m effllm_lib.sparse.quality --scale full     # writes data/results/sparamx/pruning_perplexity.csv

Each model is loaded fresh for every (method, sparsity), pruned by ``prune_weights_`` (``sparsify_``'s pruning:
same layers, method and scores, written as zeros into the float32 weights; ``kernels=True`` runs
``sparsify_`` instead, so the bf16 sparse kernels compute every decoder linear, ten times slower on a CPU
without AVX512_BF16) and scored on the same windows of the packaged English Wikipedia text
(``eval.windows``: non-overlapping, ``ctx`` tokens, ``max_windows`` spread evenly; Gemma gets BOS first).
Wanda's calibration windows come from the committed ``ci`` slice of that text; at ``full`` scale the scored
windows are taken from the rest of the text (the slice is cut off first when the full text starts with it),
so calibration and evaluation do not overlap. The interval is a percentile bootstrap over windows of
exp(sum nll / sum tokens), and ``ppl_ratio`` (pruned / dense of the same model) gets a paired one: both sides
saw the same windows.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from ..stats import bootstrap_ci

METHODS = ("magnitude", "wanda")


def _check_sparsities_methods(sparsities, methods) -> None:
    for s in sparsities:
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsities must be in [0, 1), got {s}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; expected one of {METHODS}")


def _ppl(nll, tok):
    return math.exp(float(np.sum(nll)) / float(np.sum(tok)))


def _load(name: str):
    """(model, tokenizer, bos) of a packaged model, or of the tiny random Llama of CI runs ("tiny-llama")."""
    from ..models import MODELS, load_causal_lm, tiny_causal_lm

    if name == "tiny-llama":
        model, tok = tiny_causal_lm("llama", tokenizer="byte", hidden=64)
        return model, tok, False
    model, tok = load_causal_lm(name)
    return model, tok, MODELS[name].prepend_bos


def eval_text(scale: str) -> str:
    """The scored text: the ci slice at ``ci`` scale; at ``full`` the full text without the calibration slice."""
    from ..assets import wikipedia_text

    ci = wikipedia_text("ci")
    if scale == "ci":
        return ci
    full = wikipedia_text("full")
    head = ci.strip()
    return full[len(head):] if full.startswith(head) else full


@torch.no_grad()
def pruning_perplexity(models: list[str], sparsities=(0.0, 0.5, 0.7), methods=METHODS, *, ctx: int = 512,
                       max_windows: int | None = 64, scale: str = "full", kernels: bool = False,
                       progress: bool = True, calibration_windows: int = 16,
                       on_row: Callable[[pd.DataFrame], None] | None = None) -> pd.DataFrame:
    """One row per model x method x sparsity: perplexity with its bootstrap interval, the ratio to the dense
    model (sparsity 0, method "dense": the baseline of ``ppl_ratio``) with a paired interval, tokens, windows
    and seconds. Wanda's norms come from ``calibration_windows`` windows of 256 tokens, computed once per
    model on the dense model and shared by its sparsities. With ``kernels`` every row runs the bf16 sparse kernels (dense = ``sparsify_`` with nothing
    pruned, so all rows share the bf16 weights) and a "float32" row gives the model as loaded."""
    from .. import eval as E
    from .sparsify import SparsifyConfig, _arch, _generic_targets, hf_targets, prune_weights_, sparsify_, wanda_norms

    _check_sparsities_methods(sparsities, methods)
    text = eval_text(scale)
    rows = []
    for name in models:
        model, tok, bos = _load(name)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        wins, total = E.windows(ids, ctx, tok.bos_token_id if bos else None, max_windows)
        del model
        dense_nll = None
        # sparsity-major (dense, magnitude 50 %, Wanda 50 %, ...): a run cut short still compares the methods
        configs = [("dense", 0.0)] + [("float32", 0.0)] * kernels + [(m, s) for s in sparsities for m in methods
                                                                     if s > 0]
        norms = None
        for method, s in configs:
            t0 = time.perf_counter()
            model, tok, bos = _load(name)
            cfg = SparsifyConfig(sparsity=s, method=method if s > 0 else "none", calibration_windows=calibration_windows)
            if method == "wanda" and norms is None and not kernels:  # once per model, from the dense weights
                norms = wanda_norms(model, hf_targets(model) if _arch(model) else _generic_targets(model, None), cfg,
                                    tok)
            if kernels and method != "float32":  # "dense": nothing pruned, the same bf16 kernels as the rest
                sparsify_(model, cfg, tokenizer=tok)
            elif s > 0:
                prune_weights_(model, cfg, tokenizer=tok, norms=norms)
            sc = E.window_scores(model, wins, progress=progress, desc=f"{name} {method} {s:.0%}")
            nll, ntok = sc.nll_sum.numpy(), sc.tokens.numpy().astype(float)
            ppl, lo, hi = bootstrap_ci(_ppl, nll, ntok)
            row = {"model": name, "method": method, "sparsity": s, "perplexity": ppl, "ppl_lo": lo, "ppl_hi": hi}
            if dense_nll is None:
                dense_nll = nll
                row.update(ppl_ratio=1.0, ratio_lo=1.0, ratio_hi=1.0)
            else:
                r, rlo, rhi = bootstrap_ci(lambda a, b, t: _ppl(a, t) / _ppl(b, t), nll, dense_nll, ntok)
                row.update(ppl_ratio=r, ratio_lo=rlo, ratio_hi=rhi)
            row.update(tokens=int(ntok.sum()), windows=len(wins), total_windows=total, ctx=ctx, bos=bos,
                       calibration_tokens=calibration_windows * 256 if method == "wanda" else 0,
                       compute="sparse kernels (bf16)" if kernels and method != "float32" else "masked float32",
                       seconds=time.perf_counter() - t0)
            rows.append(row)
            del model
            if on_row is not None:
                on_row(pd.DataFrame(rows))
    return pd.DataFrame(rows)


FULL_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-1.5b")


# ------------------------------------------------------------------------ what the thresholds actually prune
def threshold_counts(weight: torch.Tensor, score: torch.Tensor, sparsity: float, per_row: bool,
                     pruned: torch.Tensor) -> dict[str, int]:
    """Counts for one layer pruned at ``sparsity`` by ``score`` (per layer, or per output row): ``asked``
    (round(sparsity * count) per group), ``below`` / ``tied`` (scores below / equal to the group's ``kthvalue``
    threshold), ``at_or_below`` (what zeroing every score <= threshold would prune), ``zero_before`` (weights
    already exactly zero) and ``zero_after`` (zeros in ``pruned``, the pruning function's output)."""
    s = score.float().reshape(1, -1) if not per_row else score.float()
    k = int(round(sparsity * s.shape[1]))
    out = {"weights": weight.numel(), "asked": k * s.shape[0], "zero_before": int((weight == 0).sum()),
           "zero_after": int((pruned == 0).sum())}
    if k == 0:
        return out | {"below": 0, "tied": 0, "at_or_below": 0}
    thr = s.kthvalue(k, dim=1, keepdim=True).values
    below, tied = int((s < thr).sum()), int((s == thr).sum())
    return out | {"below": below, "tied": tied, "at_or_below": below + tied}


@torch.no_grad()
def sparsity_reached(model, sparsities=(0.0, 0.5, 0.7), methods=METHODS, tokenizer=None, calibration=None,
                     model_name: str = "model", layer_stride: int = 1) -> pd.DataFrame:
    """One row per method x sparsity over all the linears ``sparsify_`` prunes: the fraction of weights asked
    for, the fraction zero after ``sparsify_``'s pruning (``reached``), the fraction a plain ``<= kthvalue``
    threshold would zero (``at_or_below``), the fraction tied at the threshold, and the fraction already zero
    in the dense weights. The model is not modified; Wanda's norms are computed once from the dense model.
    ``layer_stride`` > 1 counts every that-many-th decoder layer only (0, stride, ...): a sample, for a model
    whose full count (two ``kthvalue`` passes over every weight per sparsity) is too slow on a small CPU."""
    from .pruning import prune_magnitude, prune_wanda
    from .sparsify import SparsifyConfig, _arch, _generic_targets, hf_targets, wanda_norms

    _check_sparsities_methods(sparsities, methods)
    if not isinstance(layer_stride, int) or layer_stride < 1:
        raise ValueError(f"layer_stride must be a positive int, got {layer_stride!r}")
    names = hf_targets(model) if _arch(model) is not None else _generic_targets(model, None)
    if layer_stride > 1:
        names = [n for n in names if int(n.split("layers.")[1].split(".")[0]) % layer_stride == 0]
    norms = wanda_norms(model, names, SparsifyConfig(method="wanda"), tokenizer, calibration) \
        if "wanda" in methods else {}
    rows = []
    for method in methods:
        for sp in sparsities:
            tot: dict[str, int] = {}
            for n in names:
                w = model.get_submodule(n).weight.detach()
                if method == "wanda":
                    score, pruned = w.abs().float() * norms[n].float()[None, :], prune_wanda(w, norms[n], sp)
                else:
                    score, pruned = w.abs().float(), prune_magnitude(w, sp)
                for key, v in threshold_counts(w, score, sp, method == "wanda", pruned).items():
                    tot[key] = tot.get(key, 0) + v
            n_w = tot["weights"]
            rows.append({"model": model_name, "method": method, "sparsity": sp, "layer_stride": layer_stride,
                         "linears": len(names), "weights": n_w,
                         "asked": tot["asked"] / n_w, "reached": tot["zero_after"] / n_w,
                         "at_or_below": tot["at_or_below"] / n_w, "tied": tot["tied"] / n_w,
                         "zero_before": tot["zero_before"] / n_w})
    return pd.DataFrame(rows)


def load_pruning_perplexity() -> pd.DataFrame:
    """The committed perplexity runs, one file per run (``pruning_perplexity`` and ``pruning_perplexity_*``),
    as one table; each row keeps its run's commit and scale in ``run_commit`` / ``run_scale`` and its scored
    windows in ``windows``. Raises ``FileNotFoundError`` when there is none."""
    from .. import results

    frames = []
    for name in sorted(results.available("sparamx")):
        if name == "pruning_perplexity" or name.startswith("pruning_perplexity_"):
            df = results.load("sparamx", name)
            prov = df.attrs["provenance"]
            if "calibration_tokens" not in df:  # runs before the column: SparsifyConfig's default, 16 x 256
                df["calibration_tokens"] = np.where(df.method == "wanda", 16 * 256, 0)
            frames.append(df.assign(run=name, run_commit=prov["commit"][:8], run_scale=prov["scale"]))
    if not frames:
        raise FileNotFoundError("no pruning_perplexity results committed in data/results/sparamx")
    return pd.concat(frames, ignore_index=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=("ci", "full"), default="ci",
                    help="ci: the tiny random Llama on the ci text, printed only; full: saved")
    ap.add_argument("--models", default=",".join(FULL_MODELS))
    ap.add_argument("--sparsities", default="0,0.5,0.7")
    ap.add_argument("--methods", default="magnitude,wanda")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=64,
                    help="windows per model (the same for every model); a per-model cap: name=N,...")
    ap.add_argument("--max-windows-per-model", default="",
                    help="override for some models, e.g. qwen2.5-1.5b=16 (a larger model on a slow machine)")
    ap.add_argument("--kernels", action="store_true",
                    help="run the bf16 sparse kernels (default: sparsify_'s pruning as zeros in float32 weights)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--calibration-windows", type=int, default=16,
                    help="Wanda's calibration windows of 256 tokens from the ci slice (fewer for a large model)")
    ap.add_argument("--out", default="pruning_perplexity",
                    help="results name (data/results/sparamx/<out>.csv); one file per run, e.g. "
                         "pruning_perplexity_gemma3-270m, so a new model does not replace the committed ones")
    ap.add_argument("--sparsity-reached", action="store_true",
                    help="instead of perplexity (see --layer-stride): the fraction of weights each method and sparsity actually zeroes "
                         "vs a plain <= kthvalue threshold (ties of the 4-bit grid); writes <out>, default "
                         "pruning_sparsity_reached")
    ap.add_argument("--layer-stride", default="",
                    help="with --sparsity-reached: count every N-th decoder layer only, per model, e.g. "
                         "qwen2.5-1.5b=7 (a sample, for a model too large to count whole here)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = ["tiny-llama"] if args.scale == "ci" else [m for m in args.models.split(",") if m]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    if args.sparsity_reached:
        return _main_sparsity_reached(args, models, sparsities, methods)
    per_model = dict(kv.split("=") for kv in args.max_windows_per_model.split(",") if kv)
    frames = []
    def save(frames, complete):
        from .. import results

        path = results.save(pd.concat(frames, ignore_index=True), "sparamx", args.out, scale="full",
                            params={"models": list(dict.fromkeys(f.model.iloc[0] for f in frames)),
                                    "complete": complete, "sparsities": sparsities, "methods": methods,
                                    "ctx": args.ctx, "max_windows": args.max_windows,
                                    "max_windows_per_model": per_model, "kernels": args.kernels,
                                    "threads": torch.get_num_threads(),
                                    "eval_text": "packaged English Wikipedia minus the ci calibration slice",
                                    "calibration": f"Wanda: {args.calibration_windows} windows x 256 tokens "
                                                   "of the ci slice, norms computed once per model"})
        print(f"wrote {path}", flush=True)

    frames = []
    for m in models:  # saved after every (model, method, sparsity), so a run cut short keeps what it finished
        mw = int(per_model.get(m, args.max_windows))
        partial = (lambda df: save(frames + [df], complete=False)) if args.scale == "full" else None
        frames.append(pruning_perplexity([m], sparsities, methods, ctx=args.ctx, max_windows=mw, scale=args.scale,
                                         kernels=args.kernels, calibration_windows=args.calibration_windows,
                                         on_row=partial))
        print(frames[-1].round(3).to_string(index=False), flush=True)
        if args.scale == "full":
            save(frames, complete=m == models[-1])
    return 0


def _main_sparsity_reached(args, models, sparsities, methods) -> int:
    name = "pruning_sparsity_reached" if args.out == "pruning_perplexity" else args.out
    strides = {k: int(v) for k, v in (kv.split("=") for kv in args.layer_stride.split(",") if kv)}
    frames = []
    for m in models:
        t0 = time.perf_counter()
        model, tok, _ = _load(m)
        frames.append(sparsity_reached(model, sparsities, methods, tokenizer=tok, model_name=m,
                                       layer_stride=strides.get(m, 1))
                      .assign(seconds=time.perf_counter() - t0))
        del model
        print(frames[-1].round(5).to_string(index=False), flush=True)
        if args.scale == "full":
            from .. import results

            path = results.save(pd.concat(frames, ignore_index=True), "sparamx", name, scale="full",
                                params={"models": [f.model.iloc[0] for f in frames], "sparsities": sparsities,
                                        "methods": methods, "threads": torch.get_num_threads(),
                                        "layer_stride": strides,
                                        "calibration": "Wanda: 16 windows x 256 tokens of the ci slice",
                                        "scope": "every linear sparsify_ prunes (q/k/v/o, gate/up/down)"})
            print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --------------------------------------------------------------------------------------- KV-cache pruning
@torch.no_grad()
def kv_pruning_quality(model_name: str = "smollm2-135m", sparsities=(0.0, 0.3, 0.5, 0.7, 0.9), *,
                       context: int = 1024, continuation: int = 32, windows: int = 8, scale: str = "full",
                       kernel: str = "auto", progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What pruning the KV cache costs: (summary per sparsity, per-window sums).

    Each window of the text is ``context`` tokens of prompt then ``continuation`` tokens decoded one at a time
    with the true tokens fed back (teacher forcing), as the decode path runs: the prompt's K/V of every
    full-attention layer pruned by magnitude at ``sparsity`` and packed (``SparseKVCache``), the decoded tokens
    in the dense tail. The reference is the same decode with transformers' dense cache and SDPA. The prompt is
    run once per window (dense) and its K/V handed to every cache, so all rows start from the same state; each
    scores the ``continuation - 1`` next-token predictions of the decode steps (the prompt's own last
    prediction is the same for all). Per sparsity: perplexity, top-1 accuracy on the true next token and its
    drop vs dense in points (paired bootstrap over windows), agreement with the dense top-1, and the mean
    KL(dense || pruned) per token. Sparsity 0 isolates the bf16 rounding of the packed cache."""
    import copy

    import torch.nn.functional as F
    from transformers import DynamicCache

    from .. import eval as E
    from .kv_bench import _cache_kw
    from .kv_cache import SparseKVCache, SparseKVConfig, SparseKVLayer, enable_sparse_kv_

    if context < 1 or continuation < 2 or windows < 1:
        raise ValueError(f"need context >= 1, continuation >= 2, windows >= 1; got {context}, {continuation}, "
                         f"{windows}")
    model, tok, bos = _load(model_name)
    enable_sparse_kv_(model)
    kw = _cache_kw(model)
    ids = tok(eval_text(scale), add_special_tokens=False)["input_ids"]
    wins, total = E.windows(ids, context + continuation, tok.bos_token_id if bos else None, windows)
    names = ["dense"] + [f"{s:g}" for s in sparsities]
    per_window = []
    from tqdm.auto import tqdm

    for w_i, row in enumerate(tqdm(wins, desc=f"{model_name} KV pruning", disable=not progress)):
        prompt, cont = row[None, :context], row[None, context:]
        base = DynamicCache(config=model.config)
        model(input_ids=prompt, use_cache=True, **{kw: base})
        ref_logits = None
        for name in names:
            if name == "dense":
                cache = copy.deepcopy(base)
            else:
                cache = SparseKVCache(model.config, SparseKVConfig(float(name), kernel=kernel))
                for i, layer in enumerate(base.layers):
                    if isinstance(cache.layers[i], SparseKVLayer):
                        cache.update(layer.keys, layer.values, i)  # what the prefill would have stored
                    else:  # sliding-window layers stay dense
                        cache.layers[i] = copy.deepcopy(layer)
            logits = torch.cat([model(input_ids=cont[:, j:j + 1], use_cache=True, **{kw: cache}).logits[0, -1:]
                                for j in range(continuation - 1)]).float()
            target = cont[0, 1:]
            logp = torch.log_softmax(logits, -1)
            rec = {"window": w_i, "config": name, "tokens": int(target.numel()),
                   "nll_sum": float(F.nll_loss(logp, target, reduction="sum")),
                   "correct": int((logits.argmax(-1) == target).sum())}
            if ref_logits is None:
                ref_logits = logp
                rec.update(agree=rec["tokens"], kl_sum=0.0)
            else:
                rec.update(agree=int((logits.argmax(-1) == ref_logits.argmax(-1)).sum()),
                           kl_sum=float((ref_logits.exp() * (ref_logits - logp)).sum()))
            per_window.append(rec)
    pw = pd.DataFrame(per_window)
    dense = pw[pw.config == "dense"].sort_values("window")
    rows = []
    for name in names:
        d = pw[pw.config == name].sort_values("window")
        n, nll, corr = d.tokens.to_numpy(float), d.nll_sum.to_numpy(), d.correct.to_numpy(float)
        ppl, lo, hi = bootstrap_ci(_ppl, nll, n)
        acc, acc_lo, acc_hi = bootstrap_ci(lambda c, t: 100 * c.sum() / t.sum(), corr, n)
        drop, drop_lo, drop_hi = bootstrap_ci(lambda c0, c, t: 100 * (c0.sum() - c.sum()) / t.sum(),
                                              dense.correct.to_numpy(float), corr, n)
        agree, ag_lo, ag_hi = bootstrap_ci(lambda a, t: 100 * a.sum() / t.sum(), d.agree.to_numpy(float), n)
        rows.append({"model": model_name, "config": name, "kv_sparsity": 0.0 if name == "dense" else float(name),
                     "cache": "dense (SDPA)" if name == "dense" else "pruned + packed (sparse op)",
                     "perplexity": ppl, "ppl_lo": lo, "ppl_hi": hi, "top1_acc": acc, "acc_lo": acc_lo,
                     "acc_hi": acc_hi, "acc_drop_points": drop, "drop_lo": drop_lo, "drop_hi": drop_hi,
                     "agree_pct": agree, "agree_lo": ag_lo, "agree_hi": ag_hi,
                     "kl_per_token": float(d.kl_sum.sum() / n.sum()), "tokens": int(n.sum()),
                     "windows": len(d), "total_windows": total, "context": context, "continuation": continuation})
    return pd.DataFrame(rows), pw
