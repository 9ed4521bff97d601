"""Per-sequence table: each sequence's labels, kept tokens and ``sequences/*`` metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from moetrace.counting.prefix import shared_prefix
from moetrace.errors import MoetraceError
from moetrace.progress import tqdm
from moetrace.store import TraceStore, open_store

__all__ = ["sequence_table"]


def sequence_table(
    store: str | Path | TraceStore,
    by: Sequence[str] | str = (),
    *,
    skip_shared_prefix: bool = False,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """One row per sequence: its id, its ``by`` label values, how many tokens it keeps, and
    its ``sequences/*`` metadata.

    Joins token-level labels onto per-sequence metadata (what seed 000's ``base_accs``
    groups by). Returns ``seq`` int64 [S] (sorted), one str array [S] per label (the value
    of the sequence's first row), ``n_tokens`` int64 [S], the rows left after the
    shared-prefix filter when ``skip_shared_prefix`` (else all rows), and every
    ``sequences/*`` column joined on ``seq`` (MoetraceError when a sequence with tokens has
    no metadata row). Streams the seq and label columns; memory grows with the number of
    sequences, not rows.
    """
    st = open_store(store)
    by = [by] if isinstance(by, str) else list(by or [])
    for label in by:
        if label not in st.labels:
            raise MoetraceError(f"by: unknown label {label!r}; the store has {st.label_names}")
    cutoff_seq = cutoff_pos = None
    if skip_shared_prefix:
        _, cutoff_seq, cutoff_pos = shared_prefix(st, progress=progress)
    seqs, firsts, kept = [], [], []
    for chunk in tqdm(st.iter_chunks(["seq", "pos", *by]), disable=not progress, desc="sequences", unit="chunk"):
        seq = chunk["seq"]
        keep = np.ones(len(seq), dtype=bool)
        if cutoff_seq is not None:
            keep = chunk["pos"] > cutoff_pos[np.searchsorted(cutoff_seq, seq)]
        uniq, first, inverse = np.unique(seq, return_index=True, return_inverse=True)
        seqs.append(uniq)
        firsts.append(np.stack([chunk[label][first] for label in by], axis=1) if by
                      else np.zeros((len(uniq), 0), dtype=np.uint16))
        kept.append(np.bincount(inverse.reshape(-1), weights=keep, minlength=len(uniq)).astype(np.int64))
    if not seqs:
        raise MoetraceError(f"{st.path}: empty store, no sequences")
    seq = np.concatenate(seqs)
    codes = np.concatenate(firsts)
    n_kept = np.concatenate(kept)
    uniq, first, inverse = np.unique(seq, return_index=True, return_inverse=True)
    table: dict[str, np.ndarray] = {"seq": uniq}
    for i, label in enumerate(by):
        table[label] = st.decode_label(label, codes[first, i]).astype(str)
    table["n_tokens"] = np.bincount(inverse.reshape(-1), weights=n_kept, minlength=len(uniq)).astype(np.int64)
    meta = st.read_sequences()
    if meta:
        # Join the per-sequence metadata (sequences/*) on the sequence id.
        meta_seq = np.asarray(meta.pop("seq"), dtype=np.int64)
        order = np.argsort(meta_seq, kind="stable")
        pos = np.searchsorted(meta_seq[order], uniq)
        found = (pos < len(order)) & (meta_seq[order][np.minimum(pos, len(order) - 1)] == uniq)
        if not found.all():
            raise MoetraceError(
                f"{st.path}: sequence {int(uniq[~found][0])} has tokens but no row in sequences/*")
        rows = order[pos]
        for name, values in meta.items():
            if name not in table:
                table[name] = np.asarray(values)[rows]
    return table
