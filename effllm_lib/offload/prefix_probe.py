"""Probe many continuations of one shared history in one batch, without copying the history.

The SplitReason controller asks the small model, after every prefix of a big-model chunk, "would you close the tag
now?": ``R`` rows (the chunk's prefixes, in the small model's tokens), each followed by a ``k``-token greedy or
sampled lookahead. A batch of ``R`` rows over a KV cache of ``P`` tokens copies the history ``R`` times (about
30 GB per probe for a 1.5B model at 16k tokens). Here the history stays one row, shared by reference:

* the rows go in as a token tree (a trie: a token shared by several rows is fed once), all in one forward of batch
  1 with a 4D attention mask: each tree token sees the whole history and its own ancestors;
* each lookahead step feeds one token per row, in the same sequence, each seeing the history, its row's path in
  the tree and its row's earlier lookahead tokens; positions are those the row would have on its own;
* afterwards the cache is cropped back to the history (``DynamicCache.crop``, a view, no copy), and the tree's KV
  (a few dozen tokens) is kept so that the caller can append the KV of the row it adopts.

Extra memory: the tree and the lookahead tokens (``T + k R`` positions) plus the ``(T + R) x (P + ...)`` mask,
instead of ``R x P`` copied KV. Logits equal a separate forward of each row up to float rounding (the test checks
against recomputing every row from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def _layers(cache) -> list:
    if not hasattr(cache, "layers"):
        raise TypeError("prefix_probe needs a transformers >= 4.56 DynamicCache (with .layers)")
    return cache.layers


def cache_length(cache) -> int:
    return 0 if cache is None else int(cache.get_seq_length())


def crop_(cache, n_remove: int) -> None:
    """Drop the last ``n_remove`` positions in place. A negative argument means "remove" on every transformers
    version this project supports (5.17 reads it as a length, 5.24 only accepts the negative form)."""
    if n_remove < 0:
        raise ValueError(f"n_remove must be >= 0, got {n_remove}")
    if n_remove:
        cache.crop(-n_remove)


@dataclass
class TokenTree:
    """The rows as a trie. ``tokens[j]`` / ``depth[j]`` (1-based) of node j; ``ancestors[j, a]``: node a is on
    the path from the root to j (j included); ``ends[i]``: row i's last node (-1: an empty row)."""

    tokens: list[int]
    depth: list[int]
    ancestors: torch.Tensor
    ends: list[int]

    @classmethod
    def build(cls, rows: list[list[int]]) -> "TokenTree":
        children: list[dict] = [{}]  # children[0] is the root's
        tokens, depth, parent, ends = [], [], [], []
        for row in rows:
            node = -1  # the root
            for t in row:
                kids = children[node + 1]
                if t not in kids:
                    kids[t] = len(tokens)
                    tokens.append(int(t))
                    depth.append(1 if node < 0 else depth[node] + 1)
                    parent.append(node)
                    children.append({})
                node = kids[t]
            ends.append(node)
        n = len(tokens)
        anc = torch.zeros((n, n), dtype=torch.bool)
        for j in range(n):  # parents come before their children: copy the parent's row, add self
            if parent[j] >= 0:
                anc[j] = anc[parent[j]]
            anc[j, j] = True
        return cls(tokens, depth, anc, ends)

    def path(self, i: int) -> list[int]:
        """Node indices of row i, root to leaf (they are in increasing order)."""
        e = self.ends[i]
        return [] if e < 0 else torch.nonzero(self.ancestors[e]).flatten().tolist()


@dataclass
class PrefixProbe:
    probes: list[list[int]]        # lookahead tokens per row (stopped at the first stop id)
    first_logits: torch.Tensor     # (R, V): the logits after each row's last token
    tree: TokenTree
    tree_kv: list                  # per layer (keys, values) of the tree nodes, (1, H, T, D)
    forwards: int                  # model calls made
    lookahead_fed: int             # lookahead tokens fed (all rows, stopped rows included)

    def adopt_(self, cache, i: int) -> int:
        """Append row i's KV (the tree nodes on its path) to ``cache`` (cropped back to the history); returns
        the number of tokens appended."""
        path = self.tree.path(i)
        if path:
            idx = torch.tensor(path, device=self.tree_kv[0][0].device)
            for layer_idx, (k, v) in enumerate(self.tree_kv):
                cache.update(k.index_select(2, idx), v.index_select(2, idx), layer_idx)
        return len(path)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A (1, 1, q, kv) additive mask (0 where allowed, the dtype's minimum elsewhere), the form every attention
    implementation that takes a 4D mask accepts (eager adds it, sdpa takes it as a float bias)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    out.masked_fill_(~allowed, torch.finfo(dtype).min)
    return out[None, None]


def probe_prefixes(model, cache, rows: list[list[int]], next_logits: torch.Tensor, *, k: int,
                   sample: Callable[[torch.Tensor], int], stop_ids) -> PrefixProbe:
    """Feed each row after the history held in ``cache`` and sample a ``k``-token lookahead from each, all in
    one batch of 1 over the shared history. ``next_logits``: the logits after the history (for an empty row).
    The cache ends as it started (same length, same tensors up to the view ``crop`` leaves)."""
    if cache is None or cache_length(cache) == 0:
        raise RuntimeError("probe_prefixes needs a non-empty cache (feed the prompt first)")
    if not rows:
        raise ValueError("probe_prefixes needs at least one row")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    layers = _layers(cache)
    dev = layers[0].keys.device
    dtype = layers[0].keys.dtype if layers[0].keys.is_floating_point() else torch.float32
    past = cache_length(cache)
    tree = TokenTree.build(rows)
    n_rows, n_tree = len(rows), len(tree.tokens)
    forwards = 0
    logits = torch.empty((n_rows, next_logits.shape[-1]), dtype=torch.float32, device=next_logits.device)
    ends = torch.tensor(tree.ends)
    with torch.inference_mode():
        if n_tree:
            allowed = torch.ones((n_tree, past + n_tree), dtype=torch.bool)
            allowed[:, past:] = tree.ancestors
            ids = torch.tensor([tree.tokens], device=dev)
            pos = torch.tensor([[past + d - 1 for d in tree.depth]], device=dev)
            out = model(input_ids=ids, position_ids=pos, attention_mask=_additive(allowed.to(dev), dtype),
                        past_key_values=cache, use_cache=True, logits_to_keep=0)
            forwards += 1
            node_logits = out.logits[0].float()
            has = ends >= 0
            if bool(has.any()):
                logits[has.to(logits.device)] = node_logits[ends[has].to(node_logits.device)].to(logits.device)
            # the tree's own KV, copied out (T positions) before the lookahead grows the cache
            tree_kv = [(layer.keys[:, :, past:past + n_tree].clone(), layer.values[:, :, past:past + n_tree].clone())
                       for layer in layers]
        else:
            tree_kv = [(layer.keys[:, :, :0].clone(), layer.values[:, :, :0].clone()) for layer in layers]
        if bool((ends < 0).any()):
            logits[(ends < 0).to(logits.device)] = next_logits.float()
        first_logits = logits.clone()
        probes: list[list[int]] = [[] for _ in range(n_rows)]
        done = [False] * n_rows
        lengths = torch.tensor([len(r) for r in rows])
        # what each row's lookahead query may see of the tree: its path (an empty row: nothing)
        row_tree = torch.zeros((n_rows, n_tree), dtype=torch.bool)
        for i, e in enumerate(tree.ends):
            if e >= 0:
                row_tree[i] = tree.ancestors[e]
        fed = 0
        for step in range(k):
            toks = [sample(logits[i]) for i in range(n_rows)]
            for i, t in enumerate(toks):
                if not done[i]:
                    if t in stop_ids:
                        done[i] = True
                    else:
                        probes[i].append(t)
            if step == k - 1 or all(done):
                break
            # lookahead tokens of steps 0..step sit at past + n_tree + s * n_rows + i
            allowed = torch.zeros((n_rows, past + n_tree + (step + 1) * n_rows), dtype=torch.bool)
            allowed[:, :past] = True
            allowed[:, past:past + n_tree] = row_tree
            eye = torch.eye(n_rows, dtype=torch.bool)
            for s in range(step + 1):
                start = past + n_tree + s * n_rows
                allowed[:, start:start + n_rows] = eye
            ids = torch.tensor([toks], device=dev)
            pos = (past + lengths + step)[None].to(dev)
            out = model(input_ids=ids, position_ids=pos, attention_mask=_additive(allowed.to(dev), dtype),
                        past_key_values=cache, use_cache=True, logits_to_keep=0)
            forwards += 1
            fed += n_rows
            logits = out.logits[0].float()
        crop_(cache, cache_length(cache) - past)
    return PrefixProbe(probes, first_logits, tree, tree_kv, forwards, fed)


class IdTokenizer:
    """Text = space-separated token ids: enough tokenizer for a ``Session`` over raw ids (probe benchmarks and
    tests build their rows from ids, so no real vocabulary is needed)."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [int(t) for t in text.split()]}

    def decode(self, ids, **kw):
        return " ".join(map(str, ids))
