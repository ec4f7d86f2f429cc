"""A small Llama-architecture language model trained here from scratch, in full precision, on Wikipedia text.

    python -m effllm_lib.train_lm --steps 20 --out /tmp/lm            # CPU, CI scale (a tiny model, seconds)
    python -m effllm_lib.train_lm --scale full --sweep                # GPU: ~30 M parameters, then BitMoD sweep

On the device machine (no internet, 64 MiB carried per call): save SmolLM2's tokenizer
(``load_causal_lm("smollm2-135m")[1].save_pretrained(DIR/tok)``) and ``assets.wikipedia_text("full")`` to
``DIR/wiki.txt`` in a git-ignored folder DIR (about 12 MB), carry DIR, and run
``EFFLLM_COMMIT=<sha> PYTHONPATH=. python -m effllm_lib.train_lm --scale full --max-minutes 4 --tokenizer DIR/tok
--text DIR/wiki.txt --out /tmp/wiki-llama --sweep``; bring back ``data/results/bitmod/train_wiki-llama-30m.csv``
and ``perplexity_wiki-llama-30m.csv``.

The float reference of the accuracy study (``--preset 100m``: 113 M parameters, bf16 autocast, Wikipedia training
articles plus ``--extra-text`` Austen): training stops after ``--max-minutes`` with a checkpoint in OUT and
``--resume`` continues it exactly, so it spans several 10-minute device calls while the machine stays warm:
``python -m effllm_lib.train_lm --scale full --preset 100m --tokenizer DIR/tok --text DIR/wiki.txt
--extra-text DIR/austen.txt --out /tmp/wiki-llama-100m --max-minutes 8 [--resume]``.

Early stopping (the 100m preset): 5% of the *training* articles are a validation split scored every 50 steps, and
the step with the lowest validation loss is the model saved. Without it, the first H200 run (1,500 steps, about
ten passes over 3 M tokens) overfitted: train loss 2.5, held-out perplexity 181, worse than the 30 M model.

Why: the packaged models were distributed 4-bit (GGUF), so their "float" reference already sits on a 4-bit grid.
A model trained here in float32 / bf16 has genuinely full-precision weights to quantize.

The articles of ``assets.wikipedia_text`` (articles separated by blank lines) are split, seeded, into a training
set and a held-out set; training samples random ``seq_len`` windows of the tokenized training articles
(EOS between articles); the held-out articles are the perplexity text (saved next to the model as
``heldout.txt``). The model (transformers ``LlamaConfig``, tied embeddings, SmolLM2's tokenizer by default) and
tokenizer are written with ``save_pretrained`` into the cache, never committed: rerunning rebuilds them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F


@dataclass
class TrainConfig:
    layers: int = 6
    hidden: int = 384  # a multiple of 128: every weight row splits into whole quantization groups
    heads: int = 6  # head dim 64
    kv_heads: int = 2  # grouped-query attention, as in SmolLM2 / Llama
    seq_len: int = 512
    batch: int = 16
    steps: int = 1500  # ~12 M tokens: ~6 passes over the ~2 M training tokens (more overfits)
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    heldout_fraction: float = 0.05
    seed: int = 0
    # early stopping: a validation split of the *training* articles (never the held-out ones), scored every
    # eval_every steps; the best state is what gets saved. 0 = off (train for all steps).
    val_fraction: float = 0.0
    eval_every: int = 50
    max_minutes: float | None = None  # stop early (and say so) after this much training time

    def check(self) -> None:
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden {self.hidden} must split into {self.heads} heads of even size")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        for name in ("layers", "hidden", "seq_len", "batch", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")


# The full runs (GPU) and the CI run (CPU, seconds). "full" is the 30 M model of the first accuracy study;
# "100m" (113 M parameters: 12 layers of 768, SmolLM2's 49,152-token vocabulary, tied embeddings) is the float
# reference the accuracy study needs: 1,500 steps of 32 x 512 tokens = 24.6 M tokens, about 10 passes over the
# ~2.4 M training tokens of Wikipedia + Austen, bf16 autocast with float32 master weights.
PRESETS = {
    "full": TrainConfig(),
    "100m": TrainConfig(layers=12, hidden=768, heads=12, kv_heads=4, seq_len=512, batch=32, steps=1500, lr=1e-3,
                        warmup=100, val_fraction=0.05, eval_every=50),
    "ci": TrainConfig(layers=2, hidden=64, heads=4, kv_heads=2, seq_len=64, batch=8, steps=20, lr=3e-3, warmup=2),
}


@dataclass
class TrainResult:
    out: Path | None
    config: TrainConfig
    params: int
    log: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "seconds"}
    heldout_text: str = ""
    train_tokens: int = 0
    stopped_early: bool = False
    best_step: int | None = None  # early stopping: the step whose state was kept
    best_val_loss: float | None = None


def split_articles(text: str, heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) articles: the text split at blank lines, a seeded random ``heldout_fraction`` held out
    (at least one article each side). Whole articles, so no held-out sentence was seen in training."""
    articles = [a.strip() for a in text.split("\n\n") if a.strip()]
    if len(articles) < 2:
        raise ValueError(f"need at least 2 articles (separated by blank lines), got {len(articles)}")
    order = list(range(len(articles)))
    random.Random(seed).shuffle(order)
    n_held = min(len(articles) - 1, max(1, round(heldout_fraction * len(articles))))
    held = set(order[:n_held])
    return ([a for i, a in enumerate(articles) if i not in held], [a for i, a in enumerate(articles) if i in held])


def llama_config(cfg: TrainConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=max(128, cfg.hidden * 8 // 3 // 128 * 128),
                      
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       head_dim=cfg.hidden // cfg.heads, max_position_embeddings=cfg.seq_len,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=getattr(tokenizer, "pad_token_id", None), tie_word_embeddings=True,
                       rope_theta=10000.0)


def _lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


CHECKPOINT = "checkpoint.pt"


def train(text: str, tokenizer, cfg: TrainConfig, out: str | Path | None = None, device: str = "cpu",
          progress: bool = True, extra_text: str = "", resume: bool = False) -> TrainResult:
    """Train a fresh Llama model on the training articles of ``text`` (plus ``extra_text``, training only);
    save it (and the tokenizer and held-out text) to ``out`` when given. Deterministic for a seed on the CPU.

    Resumable: when ``max_minutes`` stops training early, the model, optimizer, step, sampler state and log
    are written to ``out/checkpoint.pt``; ``resume=True`` continues from there (the same run, step for step,
    as one uninterrupted call: the learning-rate schedule is a function of the step and the window sampler's
    generator state is restored), so a run longer than one 10-minute device call spans several."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    cfg.check()
    train_articles, held = split_articles(text, cfg.heldout_fraction, cfg.seed)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer needs an eos_token_id to separate articles")
    val_ids: list[int] = []
    if cfg.val_fraction > 0:  # carved from the training articles, so the held-out text stays untouched
        train_articles, val_articles = split_articles("\n\n".join(train_articles), cfg.val_fraction, cfg.seed + 1)
        for a in val_articles:
            val_ids += tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
        if len(val_ids) <= cfg.seq_len:
            raise ValueError(f"the validation split has {len(val_ids)} tokens, not more than one window of "
                             f"{cfg.seq_len}; raise val_fraction")
    if extra_text:
        train_articles = train_articles + [a.strip() for a in extra_text.split("\n\n") if a.strip()]
    ids = []
    for a in train_articles:
        ids += tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]
    data = torch.tensor(ids, dtype=torch.long)
    val = torch.tensor(val_ids, dtype=torch.long)
    if data.numel() <= cfg.seq_len:
        raise ValueError(f"training text has {data.numel()} tokens, not more than one window of {cfg.seq_len}")

    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(llama_config(cfg, tokenizer), dtype=torch.float32).to(device)
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            fused=device.startswith("cuda"))
    gen = torch.Generator().manual_seed(cfg.seed)
    use_bf16 = device.startswith("cuda")  # mixed precision on the GPU; the master weights stay float32
    model.train()
    result = TrainResult(out=None, config=cfg, params=params, heldout_text="\n\n".join(held),
                         train_tokens=data.numel())
    first_step, elapsed_before = 0, 0.0
    best_state = None
    ckpt_path = Path(out) / CHECKPOINT if out is not None else None
    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"resume=True but there is no {CHECKPOINT} in {out}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["config"] != {**asdict(cfg), "max_minutes": ckpt["config"]["max_minutes"]}:
            raise ValueError("the checkpoint was written with another TrainConfig; resume with the same settings")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"])
        result.log = ckpt["log"]
        best_state = ckpt.get("best_state")
        result.best_step, result.best_val_loss = ckpt.get("best_step"), ckpt.get("best_val_loss")
        first_step = ckpt["step"] + 1
        elapsed_before = result.log[-1]["seconds"] if result.log else 0.0
    start = time.perf_counter() - elapsed_before
    call_start = time.perf_counter()
    bar = tqdm(range(first_step, cfg.steps), desc=f"training {params / 1e6:.1f} M params", disable=not progress)
    for step in bar:
        starts = torch.randint(0, data.numel() - cfg.seq_len - 1, (cfg.batch,), generator=gen)
        batch = torch.stack([data[s:s + cfg.seq_len + 1] for s in starts.tolist()]).to(device)
        lr = _lr(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seconds = time.perf_counter() - start
        result.log.append({"step": step, "loss": loss.item(), "lr": lr, "seconds": seconds})
        if cfg.val_fraction > 0 and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            v = validation_loss(model, val, cfg.seq_len, device, use_bf16)
            result.log[-1]["val_loss"] = v
            if result.best_val_loss is None or v < result.best_val_loss:
                result.best_step, result.best_val_loss = step, v
                best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
            model.train()
        bar.set_postfix(loss=f"{result.log[-1]['loss']:.3f}")
        if cfg.max_minutes is not None and time.perf_counter() - call_start > 60 * cfg.max_minutes \
                and step + 1 < cfg.steps:
            result.stopped_early = True
            print(f"effllm: stopping after {step + 1} steps ({seconds:.0f} s, --max-minutes); resume with "
                  "--resume", flush=True)
            if ckpt_path is not None:
                ckpt_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = ckpt_path.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                            "step": step, "log": result.log, "config": asdict(cfg), "best_state": best_state,
                            "best_step": result.best_step, "best_val_loss": result.best_val_loss}, tmp)
                tmp.replace(ckpt_path)
            break
    if best_state is not None and not result.stopped_early:
        model.load_state_dict(best_state)  # early stopping: keep the step with the lowest validation loss
    model.eval()
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if not result.stopped_early and (out / CHECKPOINT).is_file():
            (out / CHECKPOINT).unlink()  # finished: the saved model replaces the checkpoint
        model.save_pretrained(out)
        if hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(out)
        (out / "heldout.txt").write_text(result.heldout_text)
        (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "params": params,
                                                            "train_tokens": result.train_tokens,
                                                            "steps_done": len(result.log),
                                                            "best_step": result.best_step,
                                                            "best_val_loss": result.best_val_loss,
                                                            "finished": not result.stopped_early}, indent=1))
        result.out = out
    result.model = model
    return result


@torch.no_grad()
def validation_loss(model, val: torch.Tensor, seq_len: int, device: str, bf16: bool, max_windows: int = 64) -> float:
    """Mean next-token loss over up to ``max_windows`` consecutive non-overlapping windows of ``val``."""
    model.eval()
    n = min(max_windows, (val.numel() - 1) // seq_len)
    losses = []
    for i in range(n):
        w = val[i * seq_len:(i + 1) * seq_len + 1].to(device)[None]
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=w[:, :-1]).logits
        losses.append(F.cross_entropy(logits.float()[0], w[0, 1:]).item())
    return sum(losses) / len(losses)


def load_trained(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a model saved by ``train``, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no trained model (run python -m effllm_lib.train_lm)")
    return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval(),
            AutoTokenizer.from_pretrained(folder))


def default_out(scale: str) -> Path:
    from .paths import cache_dir

    return cache_dir() / "trained" / f"wiki-llama-{scale}"


MODEL_NAME = "wiki-llama-30m"  # the name the full model's results carry


def main(argv=None) -> int:
    from transformers import AutoTokenizer

    from . import assets, results

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=("ci", "full"), default="ci", help="preset (model size, batch, text)")
    ap.add_argument("--preset", choices=tuple(PRESETS), default=None,
                    help="model size and schedule (default: --scale's); 100m = the 113 M float reference")
    ap.add_argument("--extra-text", action="append", default=[],
                    help="more training-only text files (e.g. Austen's novels); never held out")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (a --max-minutes stop)")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    ap.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    ap.add_argument("--out", default=None, help="model folder (default: the cache)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: SmolLM2's from the cache)")
    ap.add_argument("--text", default=None, help="text file of articles separated by blank lines "
                                                 "(default: assets.wikipedia_text(scale))")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep", action="store_true", help="then run the BitMoD perplexity sweep (3, 4 bits) on "
                                                         "the held-out articles and save it with results.save")
    ap.add_argument("--max-windows", type=int, default=None, help="sweep: held-out windows (default: all)")
    ap.add_argument("--results-scale", choices=("ci", "full"), default=None,
                    help="results.save scale (default: --scale; 'ci' for a trial run of the full preset)")
    args = ap.parse_args(argv)

    preset = args.preset or args.scale
    cfg = TrainConfig(**{**asdict(PRESETS[preset]), "seed": args.seed, "max_minutes": args.max_minutes})
    if args.steps is not None:
        cfg.steps = args.steps
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from .models import hf_dir
        tok = AutoTokenizer.from_pretrained(hf_dir("smollm2-135m"))
    text = Path(args.text).read_text() if args.text else assets.wikipedia_text(args.scale)
    extra = "\n\n".join(Path(p).read_text() for p in args.extra_text)
    out = Path(args.out) if args.out else default_out(preset)
    r = train(text, tok, cfg, out, device=args.device, extra_text=extra, resume=args.resume)
    first, last = r.log[0]["loss"], sum(x["loss"] for x in r.log[-20:]) / len(r.log[-20:])
    print(f"trained {r.params / 1e6:.1f} M params, {len(r.log)} steps, {r.train_tokens} train tokens: "
          f"loss {first:.3f} -> {last:.3f}; saved to {out}", flush=True)
    if r.stopped_early:
        print(f"effllm: not finished ({len(r.log)} of {cfg.steps} steps); run again with --resume", flush=True)
        return 0
    from . import eval as E

    held = E.perplexity(r.model, tok, r.heldout_text, seq_len=cfg.seq_len, bos=False, progress=False)
    print(f"held-out perplexity {held.ppl:.2f} on {held.tokens} tokens ({held.windows} windows of {cfg.seq_len})"
          + (f"; kept step {r.best_step} (validation loss {r.best_val_loss:.3f})" if r.best_step is not None else ""),
          flush=True)
    name = MODEL_NAME if preset == "full" else f"wiki-llama-{preset}"
    save_scale = args.results_scale or args.scale
    params = {**asdict(cfg), "params": r.params, "train_tokens": r.train_tokens, "steps_done": len(r.log),
              "stopped_early": r.stopped_early, "device": args.device, "tokenizer": "SmolLM2-135M (49152)",
              "preset": preset, "extra_text": [Path(p).name for p in args.extra_text],
              "heldout_ppl": held.ppl, "heldout_tokens": held.tokens, "resumed": args.resume,
              "best_step": r.best_step, "best_val_loss": r.best_val_loss}
    import pandas as pd

    results.save(pd.DataFrame(r.log), "bitmod", f"train_{name}", params=params, scale=save_scale)
    if args.sweep:
        from .bitmod import accuracy as A

        df = A.perplexity_sweep(lambda: load_trained(out, args.device), {"wikipedia_heldout": r.heldout_text},
                                bits=(3, 4), seq_len=cfg.seq_len, max_windows=args.max_windows, model_name=name,
                                progress=False, bos=False, log=lambda m: print(m, flush=True))
        results.save(df, "bitmod", f"perplexity_{name}", scale=save_scale,
                     params={"model": name, "methods": list(A.METHODS), "bits": [3, 4], "seq_len": cfg.seq_len,
                             "max_windows": args.max_windows, "corpora": ["wikipedia_heldout"], "group_size": 128,
                             "device": args.device, "train": params})
        print(df[["dtype", "bits", "bits_per_weight", "ppl"]].to_string(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
