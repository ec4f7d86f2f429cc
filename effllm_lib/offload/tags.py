"""``<bigmodel>`` / ``</bigmodel>`` as vocabulary tokens, initialised from the text they replace.

The original wrote the tags as plain text (``<``, ``big``, ``model``, ``>`` ...), so a tag cost several tokens and
the controller had to look for it in decoded text. Here each tag is one added token:

* **Added, not "special".** The tokens are added with ``special=False``: decoding with
  ``skip_special_tokens=True`` (what TRL's GRPO trainer does before calling the rewards) would otherwise delete
  them from the text the rewards and the controller read. ``normalized=False`` so they match the exact text.
* **Initialisation.** A fresh row is the mean of the rows of the pieces the tag text had before (input
  embedding and, when untied, output embedding alike): the model starts out reading the new token roughly as it
  read the text, instead of from noise or from the mean of the whole vocabulary.
* **Tied embeddings** (SmolLM2): one matrix serves input and output; it is resized once and the tie is checked
  afterwards. A model whose embedding already has spare rows beyond the tokenizer (Qwen2.5 pads to 151,936) is
  not shrunk: the new ids land in the spare rows, which are overwritten.
* **Already tagged.** ``add_tag_tokens`` on a tokenizer that already has either tag is an error: its rows might
  be untrained or initialised another way, and a silent no-op would make a different run. A checkpoint saved
  after tagging is used as it is, checked by ``check_tag_tokens``.
"""

from __future__ import annotations

import torch

from .rewards import BIG_CLOSE, BIG_OPEN

TAGS = (BIG_OPEN, BIG_CLOSE)


def _vocab(tokenizer) -> dict[str, int]:
    get = getattr(tokenizer, "get_vocab", None)
    if get is None or not callable(getattr(tokenizer, "add_tokens", None)):
        raise TypeError("tokenizer must be a Hugging Face tokenizer that supports add_tokens")
    return get()


def has_tag_tokens(tokenizer) -> bool:
    """True when both tags are single tokens of the tokenizer; an error when only one is."""
    vocab = _vocab(tokenizer)
    present = [t in vocab for t in TAGS]
    if any(present) and not all(present):
        raise ValueError(f"tokenizer has only one of the tags {TAGS}: a half-tagged vocabulary")
    return all(present)


def check_tag_tokens(model, tokenizer) -> tuple[int, int]:
    """(open id, close id) of a tagged tokenizer, after checking each tag encodes to exactly its one token and
    the model has embedding rows for them."""
    if not has_tag_tokens(tokenizer):
        raise ValueError(f"tokenizer has no {BIG_OPEN} / {BIG_CLOSE} tokens; call add_tag_tokens first")
    ids = tuple(tokenizer.convert_tokens_to_ids(list(TAGS)))
    for tag, i in zip(TAGS, ids):
        enc = tokenizer(f"x {tag} y", add_special_tokens=False)["input_ids"]
        if enc.count(i) != 1:
            raise ValueError(f"{tag} does not encode to its single token {i} inside text")
    rows = model.get_input_embeddings().weight.shape[0]
    if max(ids) >= rows:
        raise ValueError(f"tag ids {ids} are beyond the model's {rows} embedding rows (resize the model)")
    return ids


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@torch.no_grad()
def add_tag_tokens(model, tokenizer) -> dict:
    """Add ``<bigmodel>`` and ``</bigmodel>`` to ``tokenizer`` (in place) and give ``model`` rows for them,
    each the mean of the rows of the tag text's former pieces. Returns what was done (ids, pieces, tied)."""
    from tokenizers import AddedToken

    if has_tag_tokens(tokenizer):
        raise ValueError(f"tokenizer already has {BIG_OPEN} / {BIG_CLOSE}: a checkpoint tagged before is used "
                         "as it is (check_tag_tokens); adding them again would re-initialise trained rows")
    pieces = {t: list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TAGS}
    for tag, ids in pieces.items():
        if not ids:
            raise ValueError(f"tokenizer encodes {tag!r} to nothing; cannot initialise its embedding")
    tied_before = _is_tied(model)
    n_added = tokenizer.add_tokens([AddedToken(t, special=False, normalized=False, single_word=False,
                                               lstrip=False, rstrip=False) for t in TAGS])
    if n_added != 2:
        raise RuntimeError(f"tokenizer added {n_added} tokens, expected 2")
    new_ids = tokenizer.convert_tokens_to_ids(list(TAGS))
    emb = model.get_input_embeddings()
    rows = emb.weight.shape[0]
    old_in = emb.weight.detach().clone()
    out_layer = model.get_output_embeddings()
    old_out = None if (out_layer is None or tied_before) else out_layer.weight.detach().clone()
    old_bias = None if old_out is None or getattr(out_layer, "bias", None) is None else out_layer.bias.detach().clone()
    if max(new_ids) >= rows:
        model.resize_token_embeddings(max(new_ids) + 1, mean_resizing=False)
    emb = model.get_input_embeddings()
    for tag, i in zip(TAGS, new_ids):
        emb.weight[i] = old_in[pieces[tag]].mean(dim=0)
    out_layer = model.get_output_embeddings()
    if old_out is not None:
        for tag, i in zip(TAGS, new_ids):
            out_layer.weight[i] = old_out[pieces[tag]].mean(dim=0)
            if old_bias is not None:
                out_layer.bias[i] = old_bias[pieces[tag]].mean()
    if tied_before and not _is_tied(model):
        raise RuntimeError("resizing untied the input and output embeddings")
    return {"ids": tuple(new_ids), "pieces": pieces, "tied": tied_before, "rows": emb.weight.shape[0]}
