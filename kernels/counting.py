"""Numba counting kernels for routing traces: arrays in, count tensors out.

Every statistic is one small object in the datashader style
(``datashader/reductions.py``): it states its output ``shape`` and ``dtype``, the
``inputs`` it reads besides ``experts`` and ``group``, and four functions:

``create() -> state``
    a fresh accumulator (opaque to the driver);
``update(state, arrays) -> None``
    count one chunk of rows into ``state`` in place;
``combine(a, b) -> state``
    the state of two disjoint row ranges counted separately;
``finalize(state) -> ndarray``
    the count tensor, of ``shape`` and ``dtype``.

A driver creates one state per statistic, calls ``update`` per chunk and
``finalize`` at the end, and never knows which statistic it runs; a distributed
driver uses ``update`` as its chunk function and ``combine`` as its tree reduction.
``prime(state, arrays)`` hands over the row just before a range (only ``temporal``
uses it, so that transitions into the first row of a range are counted).

Chunk arrays (``arrays`` dict), ``n`` rows (tokens):

- ``experts``: uint8 / uint16 ``[n, L, K]``, expert ids, rank 0 = top choice;
- ``group``: int64 ``[n]``, group code in ``[0, G)``, ``-1`` = row filtered out;
- ``weights``: float16 / float32 ``[n, L, K]`` routing weights (``weight_sum``);
- ``seq``: int64 ``[n]`` and ``pos``: int32 / int64 ``[n]`` (``temporal``);
- ``token_id``: int32 / int64 ``[n]`` (``vocab``);

Design: every kernel body is written once and compiled twice (:func:`kernel`):
with ``parallel=True`` for chunks of at least ``PARALLEL_MIN_WORK`` routing rows,
and serially for smaller ones (waking the thread pool would cost more than the
work). The row-parallel kernels split the chunk into ``n_blocks`` contiguous row
blocks (``n_blocks`` = Numba's thread count when the state is created) and run
them under ``prange``. Block ``b`` writes only into its own private histogram
``buf[b]`` (a C-contiguous ``[n_blocks, P]`` buffer whose rows are padded to whole
cache lines, so no two blocks share a line): no races, no atomics, no per-chunk
allocation. The private histograms live for the whole stream and are summed once,
in ``finalize``. Ids are cast to int64 before any index arithmetic. The only kernel
that is not row-parallel is ``vocab`` (its ``[V, L, E]`` output is too large to copy
per thread): it is parallel over layers, each thread owning the disjoint slice
``out[:, l, :]``.

Expert ids ``>= E`` are never written: the kernels count them and ``update`` raises
``ValueError``. Set ``NUMBA_DISABLE_JIT=1`` to run every kernel as plain Python
(``prange`` becomes ``range``) and step through it in a debugger.
"""

from __future__ import annotations

import types

import numba
import numpy as np
from numba import prange

__all__ = [
    "ngjit",
    "ngjit_serial",
    "kernel",
    "PARALLEL_MIN_WORK",
    "CountStat",
    "ExpertsStat",
    "PathsStat",
    "PairsStat",
    "CoactStat",
    "TemporalStat",
    "WeightSumStat",
    "TokensStat",
    "VocabStat",
    "CoverageStat",
    "DistinctSeqStat",
    "STATS",
    "make_stat",
]

#: The compilation alias for every counting kernel: no GIL (the driver reads the
#: next chunk in another thread meanwhile), parallel ``prange``, on-disk cache.
ngjit = numba.njit(nogil=True, parallel=True, cache=True)
#: The same body compiled without ``parallel`` (``prange`` runs as ``range``): used for
#: small chunks, where waking the thread pool costs more than the counting.
ngjit_serial = numba.njit(nogil=True, cache=True)

#: Chunks with fewer routing rows (n x L x K) than this run the serial build.
PARALLEL_MIN_WORK = 1 << 16


class _Kernel:
    """One per-row kernel body, compiled as ``parallel`` and ``serial``; called with its work size first."""

    def __init__(self, fn):
        self.__doc__ = fn.__doc__
        self.parallel = ngjit(fn)
        # A renamed copy: Numba's on-disk cache is keyed by qualified name and bytecode,
        # not by compile flags, so the two builds must not share a name.
        serial = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__)
        serial.__qualname__ = fn.__qualname__ + "_serial"
        serial.__doc__ = fn.__doc__
        self.serial = ngjit_serial(serial)

    def __call__(self, work: int, *args):
        return (self.parallel if work >= PARALLEL_MIN_WORK else self.serial)(*args)


def kernel(fn) -> _Kernel:
    """Decorator: compile ``fn`` (a row-block kernel using ``prange``) both ways."""
    return _Kernel(fn)


_LINE = 8  # int64 / float64 values per 64-byte cache line


def _padded(size: int) -> int:
    """Row length of a private histogram: ``size`` rounded up to whole cache lines, plus one."""
    return (size + _LINE - 1) // _LINE * _LINE + _LINE


# --------------------------------------------------------------------------- kernels
# Each takes ``buf`` (int64/float64 [n_blocks, P]) and adds into row ``buf[b]``;
# each returns the number of expert ids >= E it skipped.


@kernel
def _experts_kernel(buf, experts, group, n_experts):
    """buf[b, ((g * L + l) * K + k) * E + experts[r, l, k]] += 1 for kept rows r."""
    n, n_layers, top_k = experts.shape
    lk = n_layers * top_k
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    bad = np.zeros(n_blocks, np.int64)
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        nbad = 0
        for r in range(lo, hi):
            g = np.int64(group[r])
            if g < 0:
                continue
            row = experts[r].reshape(lk)
            base = g * lk * E
            for j in range(lk):
                e = np.int64(row[j])
                if e < E:
                    h[base + j * E + e] += 1
                else:
                    nbad += 1
        bad[b] = nbad
    return bad.sum()


@kernel
def _paths_kernel(buf, experts, group, n_experts):
    """buf[b, ((g * L + l) * E + top1[l-1]) * E + top1[l]] += 1 for l in 1..L-1."""
    n, n_layers, top_k = experts.shape
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    bad = np.zeros(n_blocks, np.int64)
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        nbad = 0
        for r in range(lo, hi):
            g = np.int64(group[r])
            if g < 0:
                continue
            base = g * n_layers * E * E
            prev = np.int64(experts[r, 0, 0])
            for l in range(1, n_layers):
                cur = np.int64(experts[r, l, 0])
                if prev < E and cur < E:
                    h[base + (l * E + prev) * E + cur] += 1
                else:
                    nbad += 1
                prev = cur
        bad[b] = nbad
    return bad.sum()


@kernel
def _pairs_kernel(buf, experts, group, n_experts):
    """buf[b, ((g * L + l) * E + experts[r, l, 0]) * E + experts[r, l, 1]] += 1."""
    n, n_layers, top_k = experts.shape
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    bad = np.zeros(n_blocks, np.int64)
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        nbad = 0
        for r in range(lo, hi):
            g = np.int64(group[r])
            if g < 0:
                continue
            base = g * n_layers * E * E
            for l in range(n_layers):
                first = np.int64(experts[r, l, 0])
                second = np.int64(experts[r, l, 1])
                if first < E and second < E:
                    h[base + (l * E + first) * E + second] += 1
                else:
                    nbad += 1
        bad[b] = nbad
    return bad.sum()


@kernel
def _coact_kernel(buf, experts, group, n_experts):
    """Symmetric co-selection counts per layer; diagonal = selection count of the expert."""
    n, n_layers, top_k = experts.shape
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    bad = np.zeros(n_blocks, np.int64)
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        nbad = 0
        for r in range(lo, hi):
            if group[r] < 0:
                continue
            for l in range(n_layers):
                base = l * E * E
                for i in range(top_k):
                    a = np.int64(experts[r, l, i])
                    if a < E:
                        h[base + a * E + a] += 1
                        for j in range(i + 1, top_k):
                            c = np.int64(experts[r, l, j])
                            if c < E:
                                h[base + a * E + c] += 1
                                h[base + c * E + a] += 1
                    else:
                        nbad += 1
        bad[b] = nbad
    return bad.sum()


@kernel
def _temporal_kernel(buf, experts, group, seq, pos, carry, n_experts):
    """Top-1 transitions token t -> t+1 (same seq, pos + 1, both rows kept), grouped by row t.

    ``carry`` (int64 [3 + L]) is the row just before the chunk: group (-1 = none),
    seq, pos, then its top-1 expert per layer.
    """
    n, n_layers, top_k = experts.shape
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    bad = np.zeros(n_blocks, np.int64)
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        nbad = 0
        for r in range(lo, hi):
            if group[r] < 0:
                continue
            if r == 0:
                g = carry[0]
                if g < 0 or carry[1] != seq[0] or carry[2] + 1 != np.int64(pos[0]):
                    continue
            else:
                g = np.int64(group[r - 1])
                if g < 0 or seq[r - 1] != seq[r] or np.int64(pos[r - 1]) + 1 != np.int64(pos[r]):
                    continue
            base = g * n_layers * E * E
            for l in range(n_layers):
                if r == 0:
                    src = carry[3 + l]
                else:
                    src = np.int64(experts[r - 1, l, 0])
                dst = np.int64(experts[r, l, 0])
                if src < E and dst < E:
                    h[base + (l * E + src) * E + dst] += 1
                else:
                    nbad += 1
        bad[b] = nbad
    return bad.sum()


@kernel
def _weight_sum_kernel(buf, experts, group, weights, n_experts):
    """buf[b, (g * L + l) * E + experts[r, l, k]] += float64(weights[r, l, k])."""
    n, n_layers, top_k = experts.shape
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    bad = np.zeros(n_blocks, np.int64)
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        nbad = 0
        for r in range(lo, hi):
            g = np.int64(group[r])
            if g < 0:
                continue
            base = g * n_layers * E
            for l in range(n_layers):
                for k in range(top_k):
                    e = np.int64(experts[r, l, k])
                    if e < E:
                        h[base + l * E + e] += np.float64(weights[r, l, k])
                    else:
                        nbad += 1
        bad[b] = nbad
    return bad.sum()


@kernel
def _tokens_kernel(buf, group):
    """buf[b, g] += 1 for every kept row."""
    n = group.shape[0]
    n_blocks = buf.shape[0]
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        for r in range(lo, hi):
            g = np.int64(group[r])
            if g >= 0:
                h[g] += 1
    return 0


@kernel
def _vocab_kernel(out, experts, group, token_id, n_experts):
    """out[token_id[r], l, experts[r, l, k]] += 1; parallel over layers (disjoint slices).

    Rows with token_id < 0 (unknown) are skipped; token ids >= V and expert ids >= E
    are counted as bad and skipped.
    """
    n, n_layers, top_k = experts.shape
    V = np.int64(out.shape[0])
    E = np.int64(n_experts)
    bad = np.zeros(n_layers, np.int64)
    for l in prange(n_layers):
        nbad = 0
        for r in range(n):
            if group[r] < 0:
                continue
            t = np.int64(token_id[r])
            if t < 0:
                continue
            if t >= V:
                nbad += 1
                continue
            for k in range(top_k):
                e = np.int64(experts[r, l, k])
                if e < E:
                    out[t, l, e] += 1
                else:
                    nbad += 1
        bad[l] = nbad
    return bad.sum()


@kernel
def _coverage_kernel(buf, experts, group, table, kind, n_experts):
    """Per-token coverage of a target table, tallied per group as 5 int64 counters.

    kind 0 = paths (table uint8 [L, E, E], layers 1..L-1, (top1[l-1], top1[l])),
    kind 1 = experts (table uint8 [L, E], every layer, top1[l]),
    kind 2 = pairs (table uint8 [L, E, E], every layer, (rank0, rank1)).
    Counters per group g at ``buf[b, 5 * g + i]``: 0 tokens (with >= 1 possible item),
    1 tokens with any targeted item, 2 tokens with targeted >= possible / 2,
    3 targeted items, 4 possible items.
    """
    n, n_layers, top_k = experts.shape
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    flat = table.reshape(table.size)
    bad = np.zeros(n_blocks, np.int64)
    for b in prange(n_blocks):
        h = buf[b]
        lo = b * n // n_blocks  # block b: rows [lo, hi)
        hi = (b + 1) * n // n_blocks
        nbad = 0
        for r in range(lo, hi):
            g = np.int64(group[r])
            if g < 0:
                continue
            hit = 0
            possible = 0
            if kind == 1:
                for l in range(n_layers):
                    e = np.int64(experts[r, l, 0])
                    if e >= E:
                        nbad += 1
                        continue
                    possible += 1
                    hit += flat[l * E + e]
            else:
                first_layer = 1 if kind == 0 else 0
                for l in range(first_layer, n_layers):
                    if kind == 0:
                        a = np.int64(experts[r, l - 1, 0])
                        c = np.int64(experts[r, l, 0])
                    else:
                        a = np.int64(experts[r, l, 0])
                        c = np.int64(experts[r, l, 1])
                    if a >= E or c >= E:
                        nbad += 1
                        continue
                    possible += 1
                    hit += flat[(l * E + a) * E + c]
            if possible == 0:
                continue
            h[5 * g] += 1
            if hit > 0:
                h[5 * g + 1] += 1
            if 2 * hit >= possible:
                h[5 * g + 2] += 1
            h[5 * g + 3] += hit
            h[5 * g + 4] += possible
        bad[b] = nbad
    return bad.sum()


# --------------------------------------------------------------------------- statistics


def _check_bad(name: str, nbad: int, n_experts: int) -> None:
    if nbad:
        raise ValueError(
            f"{name}: {int(nbad)} expert/token ids out of range (expected expert ids in [0, {n_experts}))"
        )


class CountStat:
    """Base of the row-parallel statistics (per-block private histograms).

    Parameters: ``n_groups`` G, ``n_layers`` L, ``top_k`` K, ``n_experts`` E,
    ``n_blocks`` (private histograms; default: Numba's current thread count).
    Subclasses set ``name``, ``dtype``, ``inputs``, ``shape`` and ``_run(buf, arrays)``.
    """

    name = ""
    dtype = np.dtype(np.int64)
    inputs: tuple[str, ...] = ()

    def __init__(self, n_groups: int, n_layers: int, top_k: int, n_experts: int, n_blocks: int | None = None):
        self.n_groups = int(n_groups)
        self.n_layers = int(n_layers)
        self.top_k = int(top_k)
        self.n_experts = int(n_experts)
        self.n_blocks = int(n_blocks or numba.get_num_threads())

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def create(self):
        """A zeroed ``[n_blocks, P]`` buffer of private histograms (P = size padded to cache lines)."""
        return np.zeros((self.n_blocks, _padded(self.size)), dtype=self.dtype)

    def update(self, state, arrays: dict) -> None:
        """Count one chunk (see the module docstring for ``arrays``) into ``state`` in place."""
        experts = np.ascontiguousarray(arrays["experts"])
        group = np.ascontiguousarray(arrays["group"], dtype=np.int64)
        if experts.ndim != 3 or experts.shape[0] != group.shape[0]:
            raise ValueError(
                f"{self.name}: expected experts [n, L, K] and group [n], got {experts.shape} and {group.shape}"
            )
        if experts.shape[0] == 0:
            return
        _check_bad(self.name, self._run(state, experts, group, arrays), self.n_experts)

    def prime(self, state, arrays: dict) -> None:
        """Hand over the row just before the counted range (no-op unless a statistic looks back)."""

    def combine(self, a, b):
        """State of two disjoint row ranges: private histograms add."""
        return a + b

    def finalize(self, state) -> np.ndarray:
        """Sum the private histograms into the count tensor of ``shape``."""
        return state[:, : self.size].sum(axis=0).reshape(self.shape)


class ExpertsStat(CountStat):
    """``experts`` int64 [G, L, K, E]: how often expert e is chosen at rank k of layer l."""

    name = "experts"

    @property
    def shape(self):
        return (self.n_groups, self.n_layers, self.top_k, self.n_experts)

    def _run(self, buf, experts, group, arrays):
        return _experts_kernel(experts.size, buf, experts, group, self.n_experts)


class PathsStat(CountStat):
    """``paths`` int64 [G, L, E, E]: top-1 at layer l-1 (prev) -> top-1 at layer l; [:, 0] is zero."""

    name = "paths"

    @property
    def shape(self):
        return (self.n_groups, self.n_layers, self.n_experts, self.n_experts)

    def _run(self, buf, experts, group, arrays):
        return _paths_kernel(experts.size, buf, experts, group, self.n_experts)


class PairsStat(CountStat):
    """``pairs`` int64 [G, L, E, E]: ordered (rank-0 expert, rank-1 expert) per layer; needs K >= 2."""

    name = "pairs"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.top_k < 2:
            raise ValueError(f"pairs: needs top_k >= 2, got top_k={self.top_k}")

    @property
    def shape(self):
        return (self.n_groups, self.n_layers, self.n_experts, self.n_experts)

    def _run(self, buf, experts, group, arrays):
        return _pairs_kernel(experts.size, buf, experts, group, self.n_experts)


class CoactStat(CountStat):
    """``coact`` int64 [L, E, E], not grouped (filtered rows are still dropped).

    Off-diagonal [l, i, j] = tokens whose top-k at layer l holds both i and j
    (symmetric); diagonal [l, i, i] = tokens whose top-k holds i, so the OLMoE ratio
    N(E_i, E_j) / N(E_i) is ``coact[l, i, j] / coact[l, i, i]``. Assumes a token's
    top-k ids are distinct.
    """

    name = "coact"

    @property
    def shape(self):
        return (self.n_layers, self.n_experts, self.n_experts)

    def _run(self, buf, experts, group, arrays):
        return _coact_kernel(experts.size * self.top_k, buf, experts, group, self.n_experts)


class TemporalStat(CountStat):
    """``temporal`` int64 [G, L, E, E]: top-1 of token t -> top-1 of token t+1 at each layer.

    A transition is counted when rows r-1 and r (in store order) have the same
    ``seq``, ``pos[r] == pos[r-1] + 1`` and both rows are kept (group >= 0); it is
    grouped by row r-1 and belongs to the range holding row r. The last row of each
    chunk is carried into the next, and ``prime`` gives the row before a range, so
    disjoint ranges add up exactly. State: ``(buf, carry)``.
    """

    name = "temporal"
    inputs = ("seq", "pos")

    @property
    def shape(self):
        return (self.n_groups, self.n_layers, self.n_experts, self.n_experts)

    def create(self):
        carry = np.full(3 + self.n_layers, -1, dtype=np.int64)
        return (super().create(), carry)

    def _set_carry(self, carry, experts, group, seq, pos) -> None:
        carry[0] = group[-1]
        carry[1] = seq[-1]
        carry[2] = pos[-1]
        carry[3:] = experts[-1, :, 0]

    def _run(self, state, experts, group, arrays):
        buf, carry = state
        seq = np.ascontiguousarray(arrays["seq"], dtype=np.int64)
        pos = np.ascontiguousarray(arrays["pos"])
        nbad = _temporal_kernel(experts.size, buf, experts, group, seq, pos, carry, self.n_experts)
        self._set_carry(carry, experts, group, seq, pos)
        return nbad

    def prime(self, state, arrays):
        """Carry the row just before the range (1-row arrays: experts, group, seq, pos)."""
        if len(arrays["group"]):
            self._set_carry(state[1], arrays["experts"], arrays["group"], arrays["seq"], arrays["pos"])

    def combine(self, a, b):
        return (a[0] + b[0], b[1].copy())

    def finalize(self, state):
        return super().finalize(state[0])


class WeightSumStat(CountStat):
    """``weight_sum`` float64 [G, L, E]: summed routing weight of expert e at layer l.

    Stored weights are float16, i.e. multiples of 2**-24, so their float64 sums are
    exact (below 2**29 per cell) and chunking does not change them either.
    """

    name = "weight_sum"
    dtype = np.dtype(np.float64)
    inputs = ("weights",)

    @property
    def shape(self):
        return (self.n_groups, self.n_layers, self.n_experts)

    def _run(self, buf, experts, group, arrays):
        weights = np.ascontiguousarray(arrays["weights"])
        if weights.shape != experts.shape:
            raise ValueError(f"weight_sum: expected weights of shape {experts.shape}, got {weights.shape}")
        if weights.dtype == np.float16:  # Numba has no float16 arithmetic
            weights = weights.astype(np.float32)
        return _weight_sum_kernel(experts.size, buf, experts, group, weights, self.n_experts)


class TokensStat(CountStat):
    """``tokens`` int64 [G]: rows counted per group."""

    name = "tokens"

    @property
    def shape(self):
        return (self.n_groups,)

    def _run(self, buf, experts, group, arrays):
        return _tokens_kernel(group.size * 8, buf, group)


class VocabStat(CountStat):
    """``vocab`` int64 [V, L, E]: token id x layer x expert, all ranks, not grouped.

    Parallel over layers into one shared tensor (each thread owns ``[:, l, :]``), as
    a per-thread copy of a vocabulary-sized tensor would not fit. Rows with
    ``token_id < 0`` (unknown) are skipped; ``token_id >= V`` raises.
    """

    name = "vocab"
    inputs = ("token_id",)

    def __init__(self, n_groups, n_layers, top_k, n_experts, n_blocks=None, *, vocab_size: int):
        super().__init__(n_groups, n_layers, top_k, n_experts, n_blocks)
        self.vocab_size = int(vocab_size)

    @property
    def shape(self):
        return (self.vocab_size, self.n_layers, self.n_experts)

    def create(self):
        return np.zeros(self.shape, dtype=self.dtype)

    def _run(self, out, experts, group, arrays):
        token_id = np.ascontiguousarray(arrays["token_id"])
        return _vocab_kernel(experts.size, out, experts, group, token_id, self.n_experts)

    def finalize(self, state):
        return state.copy()


class CoverageStat(CountStat):
    """Seed 000's "proportions to be ablated" counters, int64 [G, 5].

    ``kind`` is ``"paths"``, ``"experts"`` or ``"pairs"``; ``table`` is bool
    [L, E, E] ([l, prev, target] for paths, [l, first, second] for pairs) or [L, E]
    (experts). Columns: tokens (with at least one possible item), tokens with any
    targeted item, tokens with targeted >= possible * 0.5, targeted items, possible
    items. Possible items per token: layers 1..L-1 (paths), every layer (experts,
    pairs).
    """

    name = "coverage"
    KINDS = {"paths": 0, "experts": 1, "pairs": 2}
    COLUMNS = ("n_toks", "n_toks_with_any", "n_toks_with_half", "n_targeted", "n_possible")

    def __init__(self, n_groups, n_layers, top_k, n_experts, n_blocks=None, *, kind: str, table):
        super().__init__(n_groups, n_layers, top_k, n_experts, n_blocks)
        if kind not in self.KINDS:
            raise ValueError(f"coverage: kind must be one of {sorted(self.KINDS)}, got {kind!r}")
        want = (n_layers, n_experts) if kind == "experts" else (n_layers, n_experts, n_experts)
        table = np.asarray(table)
        if table.shape != want:
            raise ValueError(f"coverage: expected a {kind} table of shape {want}, got {table.shape}")
        if kind == "pairs" and self.top_k < 2:
            raise ValueError(f"coverage: pairs need top_k >= 2, got top_k={self.top_k}")
        self.kind = kind
        self.table = np.ascontiguousarray(table.astype(np.uint8))

    @property
    def shape(self):
        return (self.n_groups, 5)

    def _run(self, buf, experts, group, arrays):
        return _coverage_kernel(experts.size, buf, experts, group, self.table, self.KINDS[self.kind], self.n_experts)


class DistinctSeqStat(CountStat):
    """``n_questions`` int64 [G]: distinct ``seq`` values among the kept rows of each group.

    State: a sorted int64 [m, 2] array of distinct (group, seq) pairs (memory grows
    with the number of sequences, not rows). Runs of equal (group, seq) rows are
    collapsed before ``np.unique``.
    """

    name = "n_questions"
    inputs = ("seq",)

    @property
    def shape(self):
        return (self.n_groups,)

    def create(self):
        return [np.empty((0, 2), dtype=np.int64)]

    def update(self, state, arrays):
        group = np.asarray(arrays["group"], dtype=np.int64)
        seq = np.asarray(arrays["seq"], dtype=np.int64)
        keep = group >= 0
        pairs = np.stack([group[keep], seq[keep]], axis=1)
        if len(pairs):
            change = np.ones(len(pairs), dtype=bool)
            change[1:] = (pairs[1:] != pairs[:-1]).any(axis=1)
            state[0] = np.unique(np.concatenate([state[0], pairs[change]]), axis=0)

    def combine(self, a, b):
        return [np.unique(np.concatenate([a[0], b[0]]), axis=0)]

    def finalize(self, state):
        return np.bincount(state[0][:, 0], minlength=self.n_groups).astype(np.int64)


#: Statistics by name (``vocab`` needs ``vocab_size=``; coverage and n_questions are
#: driven by ``engine.aggregate.coverage``).
STATS = {
    cls.name: cls
    for cls in (ExpertsStat, PathsStat, PairsStat, CoactStat, TemporalStat, WeightSumStat, TokensStat, VocabStat)
}


def make_stat(name: str, n_groups: int, n_layers: int, top_k: int, n_experts: int, **kwargs) -> CountStat:
    """Build the statistic ``name`` (a key of :data:`STATS`) for G groups, L layers, top-k K, E experts."""
    if name not in STATS:
        raise ValueError(f"unknown statistic {name!r}; expected one of {sorted(STATS)}")
    return STATS[name](n_groups, n_layers, top_k, n_experts, **kwargs)
