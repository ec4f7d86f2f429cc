"""Command line for SplitReason part 2: ``python -m effllm_lib.offload.train {sft,annotate,grpo,eval} --help``.

The pipeline (each step resumable; outputs under ``--out``; tables via ``results.save`` in chapter splitreason,
named with ``--tag`` so a GPU run never overwrites a CPU one):

1. ``sft --stage competence --model smollm2-135m --out runs/sft``: reference traces of the train templates.
2. ``eval --model runs/sft/final --mode alone``: held-out accuracy of the small model alone (before/after).
3. ``annotate --method llm --annotator qwen.gguf`` and/or ``--method gap --model runs/sft/final --big qwen.gguf``:
   ``<bigmodel>`` spans for the training traces (JSON lines), with a per-trace coverage / position report.
4. ``sft --stage tags --annotations ann.jsonl --model runs/sft/final --out runs/sft_tags``.
5. ``grpo --model runs/sft_tags/final --big qwen.gguf --out runs/grpo``.
6. ``eval --mode tags --model runs/grpo/final --big qwen.gguf``: accuracy and offload fraction.

On a machine without reasoning-gym, ``export-items`` here first and set ``$EFFLLM_GSM_ITEMS_DIR`` there.
Model specs: a packaged name (smollm2-135m, qwen2.5-1.5b), a ``.gguf`` file or a transformers folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _add_config_args(p: argparse.ArgumentParser, cls, skip=()) -> None:
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default, help=f"(default {f.default})")


def _config(cls, ns) -> object:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cmd_sft(ns) -> int:
    from .train_sft import SFTConfig, sft_

    cfg = _config(SFTConfig, ns)
    out = sft_(ns.model, ns.out, cfg, device=_device(ns.device), max_minutes=ns.max_minutes,
               results_name=f"train_sft_{cfg.stage}{ns.tag}", scale=ns.scale)
    print(json.dumps({k: v for k, v in out.items() if k != "log"}))
    return 0


def cmd_grpo(ns) -> int:
    from .train_grpo import GRPOSetup, grpo_

    setup = _config(GRPOSetup, ns)
    out = grpo_(ns.model, ns.big, ns.out, setup, device=_device(ns.device), max_minutes=ns.max_minutes,
                results_name=f"train_grpo{ns.tag}", scale=ns.scale)
    print(json.dumps({k: v for k, v in out.items() if k != "log"}))
    return 0


def cmd_annotate(ns) -> int:
    import pandas as pd
    import torch

    from .. import results
    from . import annotate as A
    from .problems import append_record, build_prompt, read_log
    from .sft_data import gsm_items
    from .train_sft import load_model

    device = _device(ns.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    items = gsm_items("train", ns.n_train, seed=ns.data_seed)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {r["id"] for r in read_log(out)}
    if ns.method == "llm":
        if not ns.annotator:
            raise SystemExit("--method llm needs --annotator (a chat model spec)")
        gen = A.local_generator(*load_model(ns.annotator, dtype=dtype, device=device), max_new_tokens=ns.max_new_tokens)
        spans_of = lambda t: A.llm_spans(t.steps, gen, ns.coverage)  # noqa: E731
    else:
        if not (ns.model and ns.big):
            raise SystemExit("--method gap needs --model (the small model) and --big")
        small, big = load_model(ns.model, dtype=dtype, device=device), load_model(ns.big, dtype=dtype, device=device)

        def spans_of(t):
            return A.gap_spans((*small, build_prompt(small[1], t.question) + "<think>\n"),
                               (*big, build_prompt(big[1], t.question) + "<think>\n"), t.steps, ns.coverage,
                               window=ns.window)
    from tqdm.auto import tqdm

    for t in tqdm([t for t in items if t.id not in done], desc=f"annotate {ns.method}"):
        spans = spans_of(t)
        append_record(out, {"id": t.id, "template": t.template, "steps": A.insert_tags(t.steps, spans),
                            **A.span_report(t.steps, spans)})
    rows = [r for r in read_log(out) if r["id"] in {t.id for t in items}]
    table = pd.DataFrame(rows).drop(columns=["steps"])
    results.save(table, "splitreason", f"annotation_{ns.method}{ns.tag}", scale=ns.scale,
                 params={"method": ns.method, "n_train": ns.n_train, "data_seed": ns.data_seed,
                         "coverage_target": ns.coverage, "annotator": ns.annotator, "model": ns.model, "big": ns.big,
                         "window": ns.window, "device": device})
    print(json.dumps({"items": len(table), "coverage_mean": float(table["coverage"].mean()),
                      "no_span": int((table["spans"] == 0).sum()), "mean_position": float(table["mean_position"].mean())}))
    return 0


def cmd_eval(ns) -> int:
    import pandas as pd
    import torch

    from .. import results
    from .evaluate_trained import evaluate_model
    from .train_sft import load_model

    device = _device(ns.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tok = load_model(ns.model, dtype=dtype, device=device)
    big = load_model(ns.big, dtype=dtype, device=device) if ns.big else None
    ctl = {"chunk_tokens": ns.chunk_tokens, "probe_tokens": ns.probe_tokens, "max_big_segment": ns.max_big_segment}
    records, summary = evaluate_model(model, tok, ns.log, n=ns.n, seed=ns.seed, mode=ns.mode, big=big,
                                      tag_hint=ns.tag_hint, max_new_tokens=ns.max_new_tokens,
                                      batch_size=ns.batch_size, controller_kw=ctl)
    summary.update({"label": ns.label, "mode": ns.mode})
    params = {"model": ns.model, "big": ns.big, "n": ns.n, "seed": ns.seed, "mode": ns.mode, "tag_hint": ns.tag_hint,
              "max_new_tokens": ns.max_new_tokens, "device": device, **(ctl if ns.mode == "tags" else {})}
    results.save(pd.DataFrame([summary]), "splitreason", f"trained_eval_{ns.label}{ns.tag}", params=params,
                 scale=ns.scale)
    keep = [c for c in records.columns if c != "text"]
    results.save(records[keep], "splitreason", f"trained_eval_{ns.label}_records{ns.tag}", params=params,
                 scale=ns.scale)
    print(json.dumps(summary))
    return 0


def cmd_export_items(ns) -> int:
    from .sft_data import export_items

    for spec in ns.items:
        split, n, seed = spec.split(":")
        print(export_items(split, int(n), int(seed), ns.out_dir))
    return 0


def parser() -> argparse.ArgumentParser:
    from .train_grpo import GRPOSetup
    from .train_sft import SFTConfig

    ap = argparse.ArgumentParser(prog="python -m effllm_lib.offload.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, model_required=True):
        p.add_argument("--model", required=model_required, help="small model / policy spec")
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
        p.add_argument("--scale", default="ci", choices=["ci", "full"])
        p.add_argument("--tag", default="", help="suffix of the results names (e.g. _h200)")

    p = sub.add_parser("sft", help="supervised fine-tuning (competence or tags stage)")
    common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--max-minutes", type=float, default=None, help="stop with a checkpoint after this long")
    _add_config_args(p, SFTConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("grpo", help="GRPO with controller rollouts")
    common(p)
    p.add_argument("--big", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-minutes", type=float, default=None)
    _add_config_args(p, GRPOSetup)
    p.set_defaults(func=cmd_grpo)

    p = sub.add_parser("annotate", help="tag the training traces (llm or likelihood-gap annotator)")
    common(p, model_required=False)
    p.add_argument("--method", choices=["llm", "gap"], required=True)
    p.add_argument("--annotator", help="chat model for --method llm")
    p.add_argument("--big", help="big model for --method gap")
    p.add_argument("--out", required=True, help="JSON lines of annotated traces (resumable)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--coverage", type=float, default=0.2, help="character budget (llm: requested fraction)")
    p.add_argument("--window", type=int, default=6, help="gap: tokens per window")
    p.add_argument("--max-new-tokens", type=int, default=256, help="llm: annotator answer length")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("export-items", help="write gsm items as JSON lines (the GPU machine then needs no "
                                            "reasoning-gym; point $EFFLLM_GSM_ITEMS_DIR at the folder)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("items", nargs="+", help="split:n:seed, e.g. train:4000:0 held_out:1000:0")
    p.set_defaults(func=cmd_export_items)

    p = sub.add_parser("eval", help="held-out accuracy, alone or through the controller")
    common(p)
    p.add_argument("--big")
    p.add_argument("--mode", choices=["alone", "tags"], default="alone")
    p.add_argument("--label", required=True, help="names the results, e.g. small_after_sft")
    p.add_argument("--log", required=True, help="JSON lines of completions (resumable)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag-hint", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=64)
    p.add_argument("--probe-tokens", type=int, default=8)
    p.add_argument("--max-big-segment", type=int, default=512)
    p.set_defaults(func=cmd_eval)
    return ap


def main(argv: list[str] | None = None) -> int:
    ns = parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
