"""Numba counting kernels for routing traces: arrays in, count tensors out.

One registry, one row loop
--------------------------
Every statistic is one class registered with :func:`register` (:data:`STATS`, name ->
class). The class is the only place a statistic is described; the count driver, the
xarray dims, ``moetrace count --stats`` help, the group dims of ``moetrace.metrics``
and the test parametrisations are derived from it:

``name``
    the count variable's name;
``dims``
    names of its output dims after the group dims (sizes from :data:`DIM_SIZES`:
    ``layer`` = L, ``rank`` = K, expert dims = E, ``token_id`` = ``vocab_size``);
``grouped``
    whether the tensor has the group dims in front (one per ``by`` label);
``dtype``
    int64 counts or float64 sums;
``exact_unit``
    for a float sum whose every value is a multiple of a unit (``weight_sum``: float16 weights,
    2**-24), that unit: an archive adds partial sums as int64 multiples of it, exactly;
``inputs``
    chunk arrays it reads besides ``experts`` and ``group`` (the driver refuses a
    store that lacks one, e.g. ``routing/weights``);
``min_top_k``
    the smallest K it can count (``pairs``: 2);
``needs_rank_order``
    whether it reads a token's top-1 or rank positions (``paths``, ``pairs``, ``temporal``): the
    driver refuses a store whose rank order is unknown;
``args``
    extra keyword arguments of the constructor (``vocab``: ``vocab_size``), each a
    positive integer;
``body``
    the per-row body (below), or ``None`` for a statistic with its own ``update``.

The row-block loop is written once (:func:`_row_loop`, datashader's way of compiling
its reductions): it splits a chunk into ``n_blocks`` contiguous row blocks run under
``prange``, finds runs of rows with one group code (a sequence's tokens share their
labels, so runs are long), skips filtered rows (group ``-1``) and sums the bad-id
counts. A statistic supplies only its ``body``::

    body(h, experts, group, aux, a, b, g, E) -> int   # expert ids >= E skipped

which adds rows ``[a, b)`` (all of group ``g >= 0``) into its private histogram
``h``, an int32 (float64 for sums) row of a ``[n_blocks, P]`` buffer whose rows are
padded to whole cache lines, so no two blocks share a line: no races, no atomics, no
per-chunk allocation. ``aux`` is the tuple of extra arrays returned by the class's
``_aux(arrays)``. :func:`register` compiles the template once per statistic with that
body inlined, both ``parallel`` and serial (:class:`_Kernel`); the small int32
histograms (half the cache footprint of int64) are flushed into int64 totals before
any cell could overflow. The only statistic with its own loop is ``vocab`` (its
``[V, L, E]`` output is too large to copy per thread): it is parallel over layers,
each thread owning the disjoint slice ``out[:, l, :]``.

State protocol (what a driver sees, datashader style): ``create() -> state``,
``update(state, arrays)`` (count one chunk in place), ``combine(a, b) -> state`` (two
disjoint row ranges), ``finalize(state) -> ndarray`` of ``shape`` and ``dtype``, and
``prime(state, arrays)`` (the row just before a range; only ``temporal`` uses it).

Chunk arrays (``arrays`` dict), ``n`` rows (tokens):

- ``experts``: uint8 / uint16 ``[n, L, K]``, expert ids, rank 0 = top choice;
- ``group``: int64 ``[n]``, group code in ``[0, G)``, ``-1`` = row filtered out;
- ``weights``: float16 / float32 ``[n, L, K]`` routing weights (``weight_sum``);
- ``seq``: int64 ``[n]`` and ``pos``: int32 / int64 ``[n]`` (``temporal``);
- ``token_id``: int32 / int64 ``[n]`` (``vocab``).

Adding a statistic: write its body and a subclass of :class:`CountStat` with
``@register`` in this file, and its slow reference in ``tests/test_counting.py``
(``REFERENCES``); a test fails while the reference is missing.

Expert ids ``>= E`` are never written: the kernels count them and ``update`` raises
``ValueError``. Set ``NUMBA_DISABLE_JIT=1`` to run every kernel as plain Python
(``prange`` becomes ``range``) and step through it in a debugger.
"""

from __future__ import annotations

import os
import types

import numba
import numpy as np
from numba import prange

__all__ = [
    "ngjit",
    "ngjit_serial",
    "body",
    "kernel",
    "PARALLEL_MIN_WORK",
    "DIM_SIZES",
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
    "register",
    "make_stat",
    "stat_dims",
    "expert_dims",
    "grouped_stats",
    "stats_help",
]

#: The compilation alias for every counting kernel: no GIL (the driver reads the
#: next chunk in another thread meanwhile), parallel ``prange``, on-disk cache.
ngjit = numba.njit(nogil=True, parallel=True, cache=True)
#: The same body compiled without ``parallel`` (``prange`` runs as ``range``): used for
#: small chunks, where waking the thread pool costs more than the counting.
ngjit_serial = numba.njit(nogil=True, cache=True)
#: Per-row bodies: inlined into the row loop that calls them.
body = numba.njit(nogil=True, cache=True, inline="always")

#: Chunks with less work (about n x L x K routing rows) than this run the serial build.
PARALLEL_MIN_WORK = 1 << 16

#: Output dim name -> the constructor argument giving its size.
DIM_SIZES = {
    "layer": "n_layers",
    "rank": "top_k",
    "expert": "n_experts",
    "prev_expert": "n_experts",
    "next_expert": "n_experts",
    "first": "n_experts",
    "second": "n_experts",
    "other_expert": "n_experts",
    "token_id": "vocab_size",
    "column": "n_columns",
}

_INT32_LIMIT = int(np.iinfo(np.int32).max)


def _renamed(fn, name: str, glob: dict | None = None):
    """A copy of ``fn`` named ``name`` (Numba's on-disk cache is keyed by qualified name
    and bytecode, so two builds of one body must not share a name), with ``glob`` as
    extra globals (how the row loop template gets its body)."""
    g = fn.__globals__ if glob is None else {**fn.__globals__, **glob}
    out = types.FunctionType(fn.__code__, g, name, fn.__defaults__)
    out.__qualname__ = name
    out.__doc__ = fn.__doc__
    return out


class _Kernel:
    """One kernel, compiled as ``parallel`` and ``serial``; called with its work size first."""

    def __init__(self, fn, name: str | None = None, glob: dict | None = None):
        name = name or fn.__qualname__
        self.__doc__ = fn.__doc__
        self.parallel = ngjit(_renamed(fn, name, glob) if (glob or name != fn.__qualname__) else fn)
        self.serial = ngjit_serial(_renamed(fn, name + "_serial", glob))

    def __call__(self, work: int, *args):
        if work >= PARALLEL_MIN_WORK:
            _passive_openmp()
            return self.parallel(*args)
        return self.serial(*args)


_OPENMP_SET = []


def _passive_openmp() -> None:
    """Before Numba's OpenMP pool starts (first statistic or parallel kernel): let its threads wait passively.

    Spinning workers take the CPU the chunk readers need to decompress the next chunk
    (measured: about 1.7x more rows per CPU second end to end; bench/RESULTS.md). libgomp
    reads the variable once, when it starts; a value set by the user wins. Set here rather
    than at import so that merely importing this module changes nothing.
    """
    if not _OPENMP_SET:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        _OPENMP_SET.append(True)


def kernel(fn) -> _Kernel:
    """Decorator: compile ``fn`` (a row-block kernel using ``prange``) both ways."""
    return _Kernel(fn)


_LINE_BYTES = 64


def _padded(size: int, itemsize: int) -> int:
    """Row length of a private histogram: ``size`` rounded up to whole cache lines, plus one."""
    line = _LINE_BYTES // itemsize
    return (size + line - 1) // line * line + line


# --------------------------------------------------------------------------- the row loop


def _row_loop(buf, experts, group, aux, n_experts):
    """Template: rows of a chunk in ``n_blocks`` blocks, runs of one group, ``_body`` per run.

    ``buf`` [n_blocks, P] private histograms (block b writes only ``buf[b]``); returns
    the number of expert ids >= E the bodies skipped. ``_body`` is a global that
    :func:`_row_kernel` binds per statistic.
    """
    n = group.shape[0]
    E = np.int64(n_experts)
    n_blocks = buf.shape[0]
    bad = np.zeros(n_blocks, np.int64)
    for blk in prange(n_blocks):
        h = buf[blk]
        lo = blk * n // n_blocks  # block blk: rows [lo, hi)
        hi = (blk + 1) * n // n_blocks
        nbad = 0
        r = lo
        while r < hi:
            g = group[r]
            end = r + 1
            while end < hi and group[end] == g:
                end += 1
            if g >= 0:
                nbad += _body(h, experts, group, aux, r, end, g, E)  # noqa: F821 (bound per statistic)
            r = end
        bad[blk] = nbad
    return bad.sum()


def _row_kernel(row_body, name: str) -> _Kernel:
    """The row loop with ``row_body`` inlined, compiled both ways under the name ``name``."""
    return _Kernel(_row_loop, "_row_loop_" + name, {"_body": row_body})


# --------------------------------------------------------------------------- per-row bodies
# body(h, experts, group, aux, a, b, g, E): rows [a, b) of group g into h; returns bad ids.


@body
def _bump_pair(h, l, x, y, E):
    """h[(l * E + x) * E + y] += 1 when both ids are below E; returns 1 (a bad id) otherwise.

    ``h`` is one group's slice; every index is unsigned (uint64): Numba then needs no
    negative-index wraparound per access, which costs as much as the increment itself.
    """
    if x < E and y < E:
        h[(l * E + x) * E + y] += 1
        return 0
    return 1


@body
def _experts_body(h, experts, group, aux, a, b, g, E):
    """h[((g * L + l) * K + k) * E + experts[r, l, k]] += 1."""
    n, n_layers, top_k = experts.shape
    lk = n_layers * top_k
    flat = experts.reshape(n * lk)  # a view: one flat (row, layer, rank) index per id
    hg = h[g * lk * E: (g + 1) * lk * E]
    uE = np.uint64(E)  # unsigned indices: no wraparound check per access (2x faster, bench/RESULTS.md)
    nbad = 0
    for r in range(a, b):
        row = flat[r * lk: r * lk + lk]
        for j in range(lk):
            e = np.uint64(row[j])
            if e < uE:
                hg[np.uint64(j) * uE + e] += 1
            else:
                nbad += 1
    return nbad


@body
def _paths_body(h, experts, group, aux, a, b, g, E):
    """h[((g * L + l) * E + top1[l-1]) * E + top1[l]] += 1 for l in 1..L-1."""
    n_layers = experts.shape[1]
    size = n_layers * E * E
    hg = h[g * size: (g + 1) * size]
    uE = np.uint64(E)
    nbad = 0
    for r in range(a, b):
        row = experts[r, :, 0]
        prev = np.uint64(row[0])
        for l in range(1, n_layers):
            cur = np.uint64(row[l])
            nbad += _bump_pair(hg, np.uint64(l), prev, cur, uE)
            prev = cur
    return nbad


@body
def _pairs_body(h, experts, group, aux, a, b, g, E):
    """h[((g * L + l) * E + experts[r, l, 0]) * E + experts[r, l, 1]] += 1."""
    n_layers = experts.shape[1]
    size = n_layers * E * E
    hg = h[g * size: (g + 1) * size]
    uE = np.uint64(E)
    nbad = 0
    for r in range(a, b):
        row = experts[r]
        for l in range(n_layers):
            nbad += _bump_pair(hg, np.uint64(l), np.uint64(row[l, 0]), np.uint64(row[l, 1]), uE)
    return nbad


@body
def _coact_body(h, experts, group, aux, a, b, g, E):
    """Symmetric co-selection per layer (not grouped); diagonal = selections of the expert."""
    _, n_layers, top_k = experts.shape
    nbad = 0
    for r in range(a, b):
        for l in range(n_layers):
            base = l * E * E
            for i in range(top_k):
                x = np.int64(experts[r, l, i])
                if x < E:
                    h[base + x * E + x] += 1
                    for j in range(i + 1, top_k):
                        c = np.int64(experts[r, l, j])
                        if c < E:
                            h[base + x * E + c] += 1
                            h[base + c * E + x] += 1
                else:
                    nbad += 1
    return nbad


@body
def _temporal_body(h, experts, group, aux, a, b, g, E):
    """Top-1 transitions row r-1 -> r (same seq, pos + 1, both kept), grouped by row r-1.

    ``aux = (seq int64 [n], pos int64 [n], carry int64 [3 + L])``; ``carry`` is the row
    just before the chunk: group (-1 = none), seq, pos, its top-1 expert per layer.
    """
    seq, pos, carry = aux
    n_layers = experts.shape[1]
    size = n_layers * E * E
    uE = np.uint64(E)
    nbad = 0
    for r in range(a, b):
        if r == 0:  # the transition into the chunk's first row comes from the carried row
            pg = carry[0]
            if pg < 0 or carry[1] != seq[0] or carry[2] + 1 != pos[0]:
                continue
            hg = h[pg * size: (pg + 1) * size]
            for l in range(n_layers):
                nbad += _bump_pair(hg, np.uint64(l), np.uint64(carry[3 + l]), np.uint64(experts[0, l, 0]), uE)
            continue
        pg = g if r > a else group[r - 1]  # inside a run the previous row has group g
        if pg < 0 or seq[r - 1] != seq[r] or pos[r - 1] + 1 != pos[r]:
            continue
        hg = h[pg * size: (pg + 1) * size]
        prev = experts[r - 1, :, 0]
        cur = experts[r, :, 0]
        for l in range(n_layers):
            nbad += _bump_pair(hg, np.uint64(l), np.uint64(prev[l]), np.uint64(cur[l]), uE)
    return nbad


@body
def _weight_sum_body(h, experts, group, aux, a, b, g, E):
    """h[(g * L + l) * E + experts[r, l, k]] += float64(weights[r, l, k]); ``aux = (weights,)``."""
    n, n_layers, top_k = experts.shape
    rows = experts.reshape(n, n_layers * top_k)
    weights = aux[0].reshape(n, n_layers * top_k)
    base = g * n_layers * E
    nbad = 0
    for r in range(a, b):
        for l in range(n_layers):
            for j in range(l * top_k, (l + 1) * top_k):
                e = np.int64(rows[r, j])
                if e < E:
                    h[base + l * E + e] += np.float64(weights[r, j])
                else:
                    nbad += 1
    return nbad


@body
def _tokens_body(h, experts, group, aux, a, b, g, E):
    """h[g] += rows in the run."""
    h[g] += b - a
    return 0


@body
def _coverage_body(h, experts, group, aux, a, b, g, E):
    """Per-token coverage of a target table, tallied per group as 5 counters at h[5 g + i].

    ``aux = (table uint8 flat, kind int64 [1])``: kind 0 = paths (table [L, E, E],
    layers 1..L-1, (top1[l-1], top1[l])), 1 = experts (table [L, E], every layer,
    top1[l]), 2 = pairs (table [L, E, E], every layer, (rank0, rank1)). Counters: 0
    tokens (with >= 1 possible item), 1 tokens with any targeted item, 2 tokens with
    targeted >= possible / 2, 3 targeted items, 4 possible items.
    """
    flat, kinds = aux
    kind = kinds[0]
    n_layers = experts.shape[1]
    nbad = 0
    for r in range(a, b):
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
                    x = np.int64(experts[r, l - 1, 0])
                    c = np.int64(experts[r, l, 0])
                else:
                    x = np.int64(experts[r, l, 0])
                    c = np.int64(experts[r, l, 1])
                if x >= E or c >= E:
                    nbad += 1
                    continue
                possible += 1
                hit += flat[(l * E + x) * E + c]
        if possible == 0:
            continue
        h[5 * g] += 1
        if hit > 0:
            h[5 * g + 1] += 1
        if 2 * hit >= possible:
            h[5 * g + 2] += 1
        h[5 * g + 3] += hit
        h[5 * g + 4] += possible
    return nbad


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


# --------------------------------------------------------------------------- statistics


def _check_bad(name: str, nbad: int, n_experts: int) -> None:
    if nbad:
        raise ValueError(
            f"{name}: {int(nbad)} expert/token ids out of range (expected expert ids in [0, {n_experts}))"
        )


class _State:
    """A row-loop statistic's state: private histograms, int64 totals, rows since the last flush."""

    __slots__ = ("buf", "acc", "since", "carry")

    def __init__(self, buf, acc, carry=None):
        self.buf, self.acc, self.since, self.carry = buf, acc, 0, carry


_NO_AUX = (np.zeros(1, dtype=np.int64),)


class CountStat:
    """Base of the statistics (see the module docstring for the class attributes).

    Parameters: ``n_groups`` G, ``n_layers`` L, ``top_k`` K, ``n_experts`` E,
    ``n_blocks`` (private histograms; default: Numba's current thread count), and the
    keyword arguments named in ``args``.
    """

    name = ""
    dims: tuple[str, ...] = ()
    grouped = True
    dtype = np.dtype(np.int64)
    inputs: tuple[str, ...] = ()
    min_top_k = 1
    needs_rank_order = False
    args: tuple[str, ...] = ()
    body = None
    # Counts pairs of adjacent rows: a range's first row needs the row before it (``prime``).
    looks_back = False
    # One state for all the driver's workers (updated under a lock), not one each: ``vocab``,
    # whose [V, L, E] tensor is too large to copy per thread.
    shared_state = False
    # A float statistic whose every value is an exact multiple of this unit: an archive carries its
    # partial sums between ranges as int64 multiples of it, so the total is exact in any order.
    exact_unit: float | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("body") is not None:
            cls._loop = _row_kernel(cls.__dict__["body"], cls.__name__)

    def __init__(self, n_groups: int, n_layers: int, top_k: int, n_experts: int, n_blocks: int | None = None,
                 **kwargs):
        self.n_groups = int(n_groups) if self.grouped else 1
        self.n_layers = int(n_layers)
        self.top_k = int(top_k)
        self.n_experts = int(n_experts)
        _passive_openmp()  # before get_num_threads, which starts the thread pool
        self.n_blocks = int(n_blocks or numba.get_num_threads())
        unknown = set(kwargs) - set(self.args)
        if unknown:
            raise ValueError(f"{self.name}: unexpected argument {sorted(unknown)[0]!r}; expected {list(self.args)}")
        for arg in self.args:
            value = kwargs.get(arg)
            if value is None or int(value) < 1:
                raise ValueError(f"{self.name}: needs a positive {arg}, got {value!r}")
            setattr(self, arg, int(value))
        if self.top_k < self.min_top_k:
            raise ValueError(f"{self.name}: needs top_k >= {self.min_top_k}, got top_k={self.top_k}")

    @property
    def shape(self) -> tuple[int, ...]:
        inner = tuple(getattr(self, DIM_SIZES[d]) for d in self.dims)
        return ((self.n_groups,) if self.grouped else ()) + inner

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    # ---- what a statistic with a body may override
    def _aux(self, state, arrays: dict, experts) -> tuple:
        """The extra arrays its body reads (``aux``)."""
        return _NO_AUX

    def _after(self, state, arrays: dict, experts, group) -> None:
        """Called after each chunk (``temporal`` carries its last row)."""

    def _work(self, experts) -> int:
        return experts.size

    def _per_row(self) -> int:
        """Most increments one row can add to one cell (bounds the int32 flush interval)."""
        return 1

    # ---- state protocol
    @property
    def _scratch_dtype(self):
        return np.dtype(np.float64) if self.dtype.kind == "f" else np.dtype(np.int32)

    def create(self, n_blocks: int | None = None):
        """A zeroed ``[n_blocks, P]`` buffer of private histograms (P = size padded to cache lines).

        ``n_blocks=1``: one histogram, counted by the serial build (the count driver's workers
        each count whole chunks into their own state; bench/RESULTS.md).
        """
        dt = self._scratch_dtype
        buf = np.zeros((n_blocks or self.n_blocks, _padded(self.size, dt.itemsize)), dtype=dt)
        acc = np.zeros(self.size, dtype=self.dtype) if dt != self.dtype else None
        return _State(buf, acc)

    def _flush(self, state) -> None:
        if state.acc is not None and state.since:
            state.acc += state.buf[:, : self.size].sum(axis=0, dtype=self.dtype)
            state.buf[:] = 0
            state.since = 0

    def update(self, state, arrays: dict) -> None:
        """Count one chunk (see the module docstring for ``arrays``) into ``state`` in place."""
        experts = np.ascontiguousarray(arrays["experts"])
        group = np.ascontiguousarray(arrays["group"], dtype=np.int64)
        if experts.ndim != 3 or experts.shape[0] != group.shape[0]:
            raise ValueError(
                f"{self.name}: expected experts [n, L, K] and group [n], got {experts.shape} and {group.shape}"
            )
        n = experts.shape[0]
        if n == 0:
            return
        step = max(1, _INT32_LIMIT // self._per_row())
        for a in range(0, n, step):
            b = min(n, a + step)
            part = arrays if (a, b) == (0, n) else {k: v[a:b] for k, v in arrays.items()}
            self._update(state, part, experts[a:b], group[a:b])

    def _update(self, state, arrays, experts, group) -> None:
        n = experts.shape[0]
        if state.acc is not None and (state.since + n) * self._per_row() > _INT32_LIMIT:
            self._flush(state)
        aux = self._aux(state, arrays, experts)
        if state.buf.shape[0] == 1:
            nbad = self._loop.serial(state.buf, experts, group, aux, self.n_experts)
        else:
            nbad = self._loop(self._work(experts), state.buf, experts, group, aux, self.n_experts)
        state.since += n
        self._after(state, arrays, experts, group)
        _check_bad(self.name, nbad, self.n_experts)

    def prime(self, state, arrays: dict) -> None:
        """Hand over the row just before the counted range, or none (0-row arrays); a no-op unless
        the statistic ``looks_back``."""

    def combine(self, a, b):
        """State of two disjoint row ranges: totals add (``b``'s carry is kept)."""
        self._flush(a)
        self._flush(b)
        out = _State(a.buf + b.buf, None if a.acc is None else a.acc + b.acc,
                     None if b.carry is None else b.carry.copy())
        return out

    def finalize(self, state) -> np.ndarray:
        """Sum the private histograms (and the flushed totals) into the count tensor of ``shape``."""
        total = state.buf[:, : self.size].sum(axis=0, dtype=self.dtype)
        if state.acc is not None:
            total += state.acc
        return total.reshape(self.shape)


#: The registered statistics, name -> class (in registration order).
STATS: dict[str, type[CountStat]] = {}


def register(cls: type[CountStat]) -> type[CountStat]:
    """Class decorator: add a statistic to :data:`STATS` after checking its description."""
    unknown = [d for d in cls.dims if d not in DIM_SIZES]
    if not cls.name or unknown:
        raise TypeError(f"{cls.__name__}: needs a name and dims from {sorted(DIM_SIZES)}, got {cls.dims}")
    if cls.body is None and cls.update is CountStat.update:
        raise TypeError(f"{cls.__name__}: needs a body or its own update")
    STATS[cls.name] = cls
    return cls


@register
class ExpertsStat(CountStat):
    """How often expert e is chosen at rank k of layer l."""

    name = "experts"
    dims = ("layer", "rank", "expert")
    body = _experts_body


@register
class PathsStat(CountStat):
    """Top-1 at layer l-1 (prev) -> top-1 at layer l; layer index 0 is all zeros."""

    name = "paths"
    dims = ("layer", "prev_expert", "expert")
    needs_rank_order = True
    body = _paths_body


@register
class PairsStat(CountStat):
    """Ordered (rank-0 expert, rank-1 expert) per layer."""

    name = "pairs"
    dims = ("layer", "first", "second")
    min_top_k = 2
    needs_rank_order = True
    body = _pairs_body


@register
class TemporalStat(CountStat):
    """Top-1 of token t -> top-1 of token t+1 of the same sequence at each layer.

    A transition is counted when rows r-1 and r (in store order) have the same
    ``seq``, ``pos[r] == pos[r-1] + 1`` and both rows are kept (group >= 0); it is
    grouped by row r-1 and belongs to the range holding row r. The last row of each
    chunk is carried into the next, and ``prime`` gives the row before a range, so
    disjoint ranges add up exactly.
    """

    name = "temporal"
    dims = ("layer", "expert", "next_expert")
    inputs = ("seq", "pos")
    needs_rank_order = True
    looks_back = True
    body = _temporal_body

    def create(self, n_blocks=None):
        state = super().create(n_blocks)
        state.carry = np.full(3 + self.n_layers, -1, dtype=np.int64)
        return state

    def _aux(self, state, arrays, experts):
        return (np.ascontiguousarray(arrays["seq"], dtype=np.int64),
                np.ascontiguousarray(arrays["pos"], dtype=np.int64), state.carry)

    def _after(self, state, arrays, experts, group):
        carry = state.carry
        carry[0] = group[-1]
        carry[1] = arrays["seq"][-1]
        carry[2] = arrays["pos"][-1]
        carry[3:] = experts[-1, :, 0]

    def prime(self, state, arrays):
        """Carry the row just before the range (1-row arrays: experts, group, seq, pos), or none (0 rows)."""
        if len(arrays["group"]):
            self._after(state, arrays, np.asarray(arrays["experts"]), np.asarray(arrays["group"]))
        else:
            state.carry[:] = -1


@register
class CoactStat(CountStat):
    """Experts chosen together in one token's top-k, per layer, not grouped (filtered rows still dropped).

    Off-diagonal [l, i, j] = tokens whose top-k at layer l holds both i and j
    (symmetric); diagonal [l, i, i] = tokens whose top-k holds i, so the OLMoE ratio
    N(E_i, E_j) / N(E_i) is ``coact[l, i, j] / coact[l, i, i]``. Assumes a token's
    top-k ids are distinct.
    """

    name = "coact"
    dims = ("layer", "expert", "other_expert")
    grouped = False
    body = _coact_body

    def _work(self, experts):
        return experts.size * self.top_k

    def _per_row(self):
        return self.top_k * self.top_k


@register
class WeightSumStat(CountStat):
    """Summed routing weight of expert e at layer l (router-weighted frequency), float64.

    Stored weights are float16, i.e. multiples of 2**-24, so their float64 sums are
    exact (below 2**29 per cell) and chunking does not change them either.
    """

    name = "weight_sum"
    dims = ("layer", "expert")
    dtype = np.dtype(np.float64)
    inputs = ("weights",)
    body = _weight_sum_body
    exact_unit = 2.0 ** -24  # float16's least subnormal: every float16 value is a multiple of it

    def _aux(self, state, arrays, experts):
        weights = np.ascontiguousarray(arrays["weights"])
        if weights.shape != experts.shape:
            raise ValueError(f"weight_sum: expected weights of shape {experts.shape}, got {weights.shape}")
        if weights.dtype != np.float32:  # Numba has no float16 arithmetic
            weights = weights.astype(np.float32)
        return (weights,)


@register
class TokensStat(CountStat):
    """Rows counted per group (always included)."""

    name = "tokens"
    dims = ()
    body = _tokens_body

    def _work(self, experts):
        return experts.shape[0] * 8

    def _per_row(self):
        return 1


@register
class VocabStat(CountStat):
    """Token id x layer x expert over all ranks, not grouped; rows with an unknown token id skipped.

    Parallel over layers into one shared tensor (each thread owns ``[:, l, :]``), as
    a per-thread copy of a vocabulary-sized tensor would not fit. Rows with
    ``token_id < 0`` (unknown) are skipped; ``token_id >= V`` raises.
    """

    name = "vocab"
    dims = ("token_id", "layer", "expert")
    grouped = False
    inputs = ("token_id",)
    args = ("vocab_size",)
    shared_state = True

    def create(self, n_blocks=None):
        return np.zeros(self.shape, dtype=self.dtype)

    def update(self, state, arrays):
        experts = np.ascontiguousarray(arrays["experts"])
        group = np.ascontiguousarray(arrays["group"], dtype=np.int64)
        if experts.shape[0] == 0:
            return
        token_id = np.ascontiguousarray(arrays["token_id"])
        kept = token_id[group >= 0]
        if len(kept) and int(kept.max()) >= self.shape[0]:
            raise ValueError(f"vocab: token id {int(kept.max())} is not below vocab_size {self.shape[0]} "
                             "(pass a larger --vocab-size)")
        _check_bad(self.name, _vocab_kernel(experts.size, state, experts, group, token_id, self.n_experts),
                   self.n_experts)

    def combine(self, a, b):
        return a + b

    def finalize(self, state):
        return state.copy()


class CoverageStat(CountStat):
    """Seed 000's "proportions to be ablated" counters, int64 [G, 5] (driven by ``engine`` coverage).

    ``kind`` is ``"paths"``, ``"experts"`` or ``"pairs"``; ``table`` is bool
    [L, E, E] ([l, prev, target] for paths, [l, first, second] for pairs) or [L, E]
    (experts). Columns: tokens (with at least one possible item), tokens with any
    targeted item, tokens with targeted >= possible * 0.5, targeted items, possible
    items. Possible items per token: layers 1..L-1 (paths), every layer (experts,
    pairs).
    """

    name = "coverage"
    dims = ("column",)
    KINDS = {"paths": 0, "experts": 1, "pairs": 2}
    COLUMNS = ("n_toks", "n_toks_with_any", "n_toks_with_half", "n_targeted", "n_possible")
    n_columns = len(COLUMNS)
    body = _coverage_body

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
        self.table = np.ascontiguousarray(table.astype(np.uint8)).reshape(-1)
        self._kind = np.array([self.KINDS[kind]], dtype=np.int64)

    def _aux(self, state, arrays, experts):
        return (self.table, self._kind)

    def _per_row(self):
        return max(1, self.n_layers)


class DistinctSeqStat(CountStat):
    """``n_questions`` int64 [G]: distinct ``seq`` values among the kept rows of each group.

    State: a sorted int64 [m, 2] array of distinct (group, seq) pairs (memory grows
    with the number of sequences, not rows). Runs of equal (group, seq) rows are
    collapsed before ``np.unique``.
    """

    name = "n_questions"
    inputs = ("seq",)

    def create(self, n_blocks=None):
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


# --------------------------------------------------------------------------- derived views


def make_stat(name: str, n_groups: int, n_layers: int, top_k: int, n_experts: int, **kwargs) -> CountStat:
    """Build the statistic ``name`` (a key of :data:`STATS`) for G groups, L layers, top-k K, E experts."""
    if name not in STATS:
        raise ValueError(f"unknown statistic {name!r}; expected one of {sorted(STATS)}")
    return STATS[name](n_groups, n_layers, top_k, n_experts, **kwargs)


def stat_dims(name: str) -> tuple[bool, tuple[str, ...]]:
    """``(grouped, dims after the group dims)`` of a registered statistic."""
    cls = STATS[name]
    return cls.grouped, cls.dims


def expert_dims() -> tuple[str, ...]:
    """Every output dim of a registered statistic whose coordinates are expert ids."""
    dims = (d for cls in STATS.values() for d in cls.dims if DIM_SIZES[d] == "n_experts")
    return tuple(dict.fromkeys(dims))


def grouped_stats() -> tuple[str, ...]:
    """Names of the registered statistics that have the group dims."""
    return tuple(name for name, cls in STATS.items() if cls.grouped)


def stats_help() -> str:
    """One line per registered statistic: name, dims, requirements, first docstring line."""
    lines = []
    for name, cls in STATS.items():
        dims = ", ".join((["group..."] if cls.grouped else []) + list(cls.dims))
        needs = [f"top_k >= {cls.min_top_k}"] * (cls.min_top_k > 1) + [f"--{a.replace('_', '-')}" for a in cls.args]
        needs += ["routing/weights" for column in cls.inputs if column == "weights"]  # the optional input
        doc = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
        extra = f" [needs {', '.join(needs)}]" if needs else ""
        lines.append(f"{name} ({dims}): {doc}{extra}")
    return "\n".join(lines)
