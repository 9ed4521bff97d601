"""Seed 000's ``last_shared_tok``: the token prefix every sequence shares, found in bounded memory.

Relies on the store invariant: a sequence's rows are contiguous and in increasing ``pos``
order (checked while streaming; a store that breaks it gets a MoetraceError). Two
streaming passes over ``seq``/``pos`` and the token column, one chunk at a time:

1. the row's index within its sequence (its "shifted index", R's ``cumcount``) comes
   from runs of equal ``seq`` with a carry across chunks; per shifted index ``i`` it
   tallies how many sequences have a row there and how many of those differ from the
   first sequence's token at ``i``. Index ``i`` is shared when every sequence has a row
   there and none differs; ``last_shared`` is the largest shared index + 1.
2. the ``pos`` of each sequence's ``last_shared``-th row (its cutoff).

Memory: the tallies grow with the longest sequence, the output with the number of
sequences (16 bytes each), never with the number of tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.progress import tqdm
from moetrace.store import TraceStore

__all__ = ["shared_prefix", "iter_shifted"]

_NONE = np.iinfo(np.int64).min


def iter_shifted(st: TraceStore, columns: list[str], progress: bool = False,
                 desc: str = "prefix") -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """Yield ``(chunk columns, shifted index int64 [n], new-sequence flag bool [n])`` per chunk.

    ``columns`` must include ``seq`` and ``pos``. Raises MoetraceError when a sequence's
    rows are not contiguous or its ``pos`` does not increase.
    """
    cur_seq, cur_len, cur_pos = None, 0, None
    chunks = st.iter_chunks(columns)
    for chunk in tqdm(chunks, disable=not progress, unit="chunk", desc=desc):
        seq = chunk["seq"].astype(np.int64, copy=False)
        pos = chunk["pos"].astype(np.int64, copy=False)
        n = len(seq)
        new = np.ones(n, dtype=bool)
        new[1:] = seq[1:] != seq[:-1]
        if cur_seq is not None and seq[0] == cur_seq:
            new[0] = False
        same = ~new
        prev_pos = np.empty(n, dtype=np.int64)
        prev_pos[1:] = pos[:-1]
        prev_pos[0] = cur_pos if cur_pos is not None else _NONE
        bad = same & (pos <= prev_pos)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise MoetraceError(
                f"{st.path} tokens/pos row {chunk.start + i}: expected increasing pos within sequence "
                f"{int(seq[i])} (a sequence's rows contiguous, in pos order), got pos {int(pos[i])} "
                f"after {int(prev_pos[i])}")
        # row index minus the start of its run; rows before the first start continue the
        # carried sequence, whose cur_len rows came in earlier chunks
        starts = np.flatnonzero(new)
        run_of = np.cumsum(new) - 1
        rows = np.arange(n, dtype=np.int64)
        begin = starts[np.maximum(run_of, 0)] if len(starts) else np.zeros(n, dtype=np.int64)
        shifted = np.where(run_of < 0, rows + cur_len, rows - begin)
        cur_len = int(shifted[-1]) + 1
        cur_seq, cur_pos = seq[-1], int(pos[-1])
        yield chunk, shifted, new


def _tallies(st: TraceStore, token: str, progress: bool):
    """Pass 1: (rows_at, mismatches, sequence ids in store order) with tokens from ``token``."""
    ref = None  # the first sequence's tokens by shifted index
    first_seq = None
    first_done = False
    rows_at = np.zeros(0, dtype=np.int64)
    mism = np.zeros(0, dtype=np.int64)
    seq_ids = []
    any_known = False
    for chunk, shifted, new in iter_shifted(st, ["seq", "pos", token], progress):
        tok = chunk[token]
        if token == "token_id":
            any_known = any_known or bool((tok != -1).any())
        seq = chunk["seq"]
        if first_seq is None:
            first_seq = int(seq[0])
            ref = tok[:0].copy()
        seq_ids.append(seq[new].astype(np.int64))
        if not first_done:
            in_first = seq == first_seq
            if new[1:].any():
                in_first[np.flatnonzero(new)[1 if new[0] else 0]:] = False
                first_done = True
            ref = np.concatenate([ref, tok[in_first]])
        top = int(shifted.max()) + 1
        if top > len(rows_at):
            rows_at = np.pad(rows_at, (0, top - len(rows_at)))
            mism = np.pad(mism, (0, top - len(mism)))
        rows_at += np.bincount(shifted, minlength=len(rows_at))
        known = shifted < len(ref)
        differs = np.ones(len(tok), dtype=bool)
        differs[known] = tok[known] != ref[shifted[known]]
        mism += np.bincount(shifted, weights=differs, minlength=len(mism)).astype(np.int64)
    ids = np.concatenate(seq_ids) if seq_ids else np.zeros(0, dtype=np.int64)
    return rows_at, mism, ids, any_known


def shared_prefix(store: str | Path | TraceStore, progress: bool = False) -> tuple[int, np.ndarray, np.ndarray]:
    """Seed 000's ``last_shared_tok`` over the whole store, and where it cuts each sequence.

    Exactly the R code: rows sorted by (seq, pos) get a shifted index 1..n within
    their sequence; ``last_shared`` is the largest shifted index at which every
    sequence has a row with one same token (earlier indices need not match), 0 when
    there is none (R's ``max`` of nothing keeps every row). Tokens are compared by
    ``token_id``; when every ``token_id`` is -1 (unknown) and the store has
    ``tokens/text``, by text. Streams the store twice (see the module docstring);
    memory grows with the number of sequences and the longest one, not with tokens.

    Returns ``(last_shared, seq_ids, cutoff_pos)``: int; int64 [S] sorted distinct
    sequence ids; int64 [S] the ``pos`` of each sequence's ``last_shared``-th token
    (rows with ``pos <= cutoff_pos`` are dropped; the int64 minimum when
    ``last_shared`` is 0, so nothing is dropped).
    """
    st = store if isinstance(store, TraceStore) else TraceStore.open(store)
    if len(st) == 0:
        raise MoetraceError(f"{st.path}: empty store, no shared prefix to find")
    rows_at, mism, ids, any_known = _tallies(st, "token_id", progress)
    if not any_known:
        if not st.has_token_text:
            raise MoetraceError(
                f"tokens/token_id: skip_shared_prefix needs token ids or tokens/text, "
                f"got only -1 (unknown) in {st.path}")
        rows_at, mism, ids, _ = _tallies(st, "text", progress)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    if len(sorted_ids) > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any():
        dup = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
        raise MoetraceError(
            f"{st.path} tokens/seq: the rows of sequence {dup} are not contiguous "
            f"(expected each sequence's rows together, in pos order)")
    n_seq = len(ids)
    shared = (rows_at == n_seq) & (mism == 0)
    last_shared = int(np.flatnonzero(shared).max()) + 1 if shared.any() else 0
    cutoff = np.full(n_seq, _NONE, dtype=np.int64)
    if last_shared:
        found = []
        for chunk, shifted, _ in iter_shifted(st, ["seq", "pos"], progress, desc="prefix cutoffs"):
            hit = shifted == last_shared - 1
            found.append(np.stack([chunk["seq"][hit].astype(np.int64), chunk["pos"][hit].astype(np.int64)], 1))
        pairs = np.concatenate(found)
        pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
        cutoff = pairs[:, 1]
    return last_shared, sorted_ids, cutoff
