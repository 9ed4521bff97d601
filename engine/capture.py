"""Record the routing of a transformers MoE model into a TraceStore while it runs.

    with capture(model, "trace.zarr", labels=["domain"]) as cap:
        cap.set_batch(seq=[0, 1], labels={"domain": ["math", "code"]})
        model(input_ids, attention_mask=mask)            # or model.generate(...)

For every forward pass, every non-padding token becomes one store row: its sequence id,
position (counted over the non-padding tokens of its row), token id, whether it was
generated, the batch row's labels, and for every MoE layer the experts in rank order and
their weights (optionally the full router distribution).

Batches and continuation. A forward continues the current batch when the
``transformers.Cache`` it receives (under any argument name) already holds tokens
(``Cache.get_seq_length() > 0``) and it has the same number of rows. This covers generate()
(greedy, sampling, beam search; dynamic, static and sliding-window caches), hand-written decode
loops passing the cache back, and multi-turn continuation (generate() called again on the
conversation so far with the cache), whatever the transformers release calls the argument. Any
other forward, or one after :meth:`Capture.set_batch`, starts a new batch. Which tokens are
recorded, at which position, and which are generated follow :mod:`moetrace.alignment` (the rules
replay looks routes up by): padding from the attention mask (2-D, or 4-D read through each
query's own key), positions counted over a row's tokens, a decode step's token generated, a
continuation of several tokens a new turn (its first token generated, the caller's text prompt).

Store order. The writer buffers a batch and writes it when the batch ends (the next new
batch, or exit): one sequence after the other in batch-row order, each in increasing
position, so a sequence's rows are contiguous and position-ordered in the store.
Memory is bounded by one batch. A row's turn ends at the decode step that feeds its generated
EOS (one of ``model.generation_config.eos_token_id``, read when capture starts): generate()
feeds padding to a finished row while the rest of its batch goes on, and none of that is
recorded (as a batch of one stops there); an EOS the caller feeds in a new turn ends nothing.

Beam search and several returned sequences. Beams are followed through
``Cache.reorder_cache(beam_idx)`` (called by generate() and by any hand-written beam
loop), so a recorded sequence is the history of one beam as it stood at the batch's last
forward: its prompt and the generated tokens that led to it (not the rows that happened
to sit in its batch slot). generate() returns the best one-token continuations of those
beams, so each returned sequence that ran to ``max_new_tokens`` is one recorded beam plus
its final token (a beam that stopped earlier at EOS is not recorded on its own). When a
forward has ``k`` times as many rows as ``set_batch`` gave ids (``num_beams=k``, or
``num_return_sequences=k``), rows ``b*k .. b*k+k-1`` belong to input ``b`` and only row
``b*k`` is recorded under id ``b``: for beam search the beam ranked first after the
previous step, usually but not always the history of the sequence generate() returns.
Give ``B*k`` ids (or none: fresh ids) to record every beam as its own sequence. The last
generated token never goes through the model, so a sequence has its prompt and all but
the last generated token.

The routing comes from ``moetrace.intervene.observe_routing``, so capture composes with
``intervene``: capturing while ablating records the routing actually used. The forward
stays free of host syncs: it stacks the per-layer tensors, and one hand-off (the only
torch.compile graph break capture adds) starts their device-to-host copies and queues
them; deciding batches, filtering padding and writing Zarr happen in a background writer
thread fed by a bounded queue. An error in the writer is raised in the caller (at the
next forward or on exit), and every row the writer had committed stays readable.
"""

from __future__ import annotations

import queue
import threading
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from transformers import Cache

from moetrace.alignment import Alignment, forward_inputs, mask_view
from moetrace.errors import MoetraceError
from moetrace.intervene import RouteEvent, active_interventions, observe_routing, router_sites
from moetrace.store import TraceStore

_STOP = ("stop", None)


def find_cache(args: tuple, kwargs: dict) -> Cache | None:
    """The ``transformers.Cache`` a forward received, whatever the argument is called."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Cache):
            return value
    return None


def cache_length(cache: Cache | None) -> int | torch.Tensor | None:
    """Tokens already in ``cache``: an int, a 0-d tensor (static caches count on the device;
    copied, as the forward advances it in place), or None (no cache, or no attention layer)."""
    if cache is None:
        return None
    try:
        length = cache.get_seq_length()
    except ValueError:  # a cache of linear-attention layers only keeps no token count
        return None
    return length.detach().clone() if torch.is_tensor(length) else int(length)


def _label_error(name: str, rows: int | str) -> MoetraceError:
    return MoetraceError(
        f"capture: the store has label {name!r}; expected set_batch(labels={{{name!r}: [{rows} values]}}) "
        f"before this forward, got None values")


def next_sequence_id(store: TraceStore) -> int:
    """One more than the largest sequence id ``store`` holds (0 when empty); reads ``seq`` chunk by chunk."""
    top = [int(c["seq"].max()) for c in store.iter_chunks(["seq"]) if len(c)]
    return max(top) + 1 if top else 0


class _Batch:
    """One batch as the writer buffers it until the batch ends.

    rows: batch rows of its forwards; ids: the sequence id of every ``group``-th row (the
    rows recorded); labels: label name -> value per id. Per forward: its filtered columns and
    the batch row (slot) of each of its tokens; ``reorders``: (forwards before it, beam_idx);
    ``interventions``: what changed the routing when the batch began (``active_interventions``).
    """

    def __init__(self, rows: int, ids: np.ndarray, labels: Mapping[str, np.ndarray], group: int, eos: np.ndarray,
                 interventions: tuple = ()):
        self.rows, self.ids, self.labels, self.group = rows, ids, labels, group
        self.interventions = interventions
        self.alignment = Alignment(rows, eos)
        self.columns: list[dict[str, np.ndarray]] = []
        self.owners: list[np.ndarray] = []
        self.reorders: list[tuple[int, np.ndarray]] = []

    def reorder(self, beam_idx: np.ndarray) -> None:
        if beam_idx.shape != (self.rows,) or ((beam_idx < 0) | (beam_idx >= self.rows)).any():
            raise MoetraceError(
                f"capture: Cache.reorder_cache expected {self.rows} beam indices in [0, {self.rows}) for a batch "
                f"of {self.rows} rows, got shape {beam_idx.shape}")
        self.reorders.append((len(self.owners), beam_idx.astype(np.int64)))
        self.alignment.reorder(beam_idx.astype(np.int64))

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices into the concatenated forwards' rows, in output order; rows per recorded id).

        Each recorded slot's history is walked back through the reorders: at forward f it
        owned the rows of the slot it descends from. Loops over forwards, not rows.
        """
        kept = np.arange(0, self.rows, self.group)
        n_forwards = len(self.owners)
        starts = np.zeros((len(kept), n_forwards), dtype=np.int64)
        lens = np.zeros((len(kept), n_forwards), dtype=np.int64)
        offsets = np.cumsum([0] + [len(o) for o in self.owners])
        # A reordering after the last forward picks beams for a step that never ran (generate()
        # reorders after its final step too): the beams are recorded as the last forward saw them.
        ancestor, reorders = kept.copy(), [r for r in self.reorders if r[0] < n_forwards]
        for f in range(n_forwards - 1, -1, -1):
            while reorders and reorders[-1][0] > f:  # reordered after forward f
                ancestor = reorders.pop()[1][ancestor]
            counts = np.bincount(self.owners[f], minlength=self.rows)
            first = offsets[f] + np.cumsum(counts) - counts      # owners are sorted by slot
            starts[:, f], lens[:, f] = first[ancestor], counts[ancestor]
        flat_lens = lens.reshape(-1)
        shift = starts.reshape(-1) - (np.cumsum(flat_lens) - flat_lens)
        order = np.repeat(shift, flat_lens) + np.arange(int(flat_lens.sum()))
        return order, lens.sum(axis=1)


class Capture:
    """The object ``capture(...)`` yields; call :meth:`set_batch` before each batch."""

    def __init__(self, model: nn.Module, store: TraceStore, probs: bool, queue_size: int):
        self.model = model
        self.store = store
        self.probs = probs
        self._routers = [site.module for site in router_sites(model)]
        self._n_layers = len(self._routers)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self._eos = np.asarray([] if eos is None else eos, dtype=np.int64).reshape(-1)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._events: dict[int, tuple] = {}
        self._past: int | torch.Tensor | None = None
        self._pending_batch: dict[str, Any] | None = None
        self._described = False
        self._wrapped: list[tuple[weakref.ref, Any]] = []
        # Writer-thread state. Automatic sequence ids continue after every id the (possibly
        # pre-existing) store holds; read once here, before the writer thread touches the store.
        self._next_seq = next_sequence_id(store)
        self._batch: _Batch | None = None
        self.rows_captured = 0
        self._writer = threading.Thread(target=self._write_loop, name="moetrace-capture-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ user API
    def set_batch(
        self,
        seq: Sequence[int] | np.ndarray | None = None,
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Describe the sequences of the next batch: ``seq`` ids [n] and label values per id [n].

        Applies to the next forward and to the decoding steps that continue it (generate).
        ``n`` is the batch's rows B, or B / k when each input has k rows (beams, returned
        sequences): then only row b*k is recorded for id b (see the module docstring).
        Without a call, each batch row of a new forward gets a fresh sequence id; a store
        with labels then needs them, so call this whenever the store has labels.
        """
        self.raise_writer_error()
        ids = None if seq is None else np.asarray(seq, dtype=np.int64).reshape(-1)
        values = {str(k): np.asarray(v).reshape(-1) for k, v in (labels or {}).items()}
        n = None if ids is None else len(ids)
        for name, value in values.items():
            if name not in self.store.label_names:
                raise MoetraceError(f"capture.set_batch: label {name!r} is not one of the store's labels "
                                    f"{self.store.label_names}")
            n = len(value) if n is None else n
            if len(value) != n:
                raise MoetraceError(f"capture.set_batch: expected {n} values of label {name!r} "
                                    f"(one per sequence), got {len(value)}")
        for name in self.store.label_names:
            if name not in values:
                raise _label_error(name, "one value per sequence" if n is None else n)
        self._pending_batch = {"seq": ids, "labels": values, "n": n}
        self._described = True

    def raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise MoetraceError(f"capture writer failed for {self.store.path}: {error}") from error

    # ------------------------------------------------------------------ hooks (forward path)
    def on_route(self, event: RouteEvent) -> None:
        self._events[event.position] = (event.experts, event.weights, event.probs() if self.probs else None)

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._events = {}
        self._past = cache_length(find_cache(args, kwargs))

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        events, self._events = self._events, {}
        past, self._past = self._past, None
        if not events:
            return
        if len(events) != self._n_layers:
            raise MoetraceError(f"capture: expected one routing event per MoE layer ({self._n_layers}) in a "
                                f"forward, got {len(events)}")
        input_ids, (B, S), mask = forward_inputs(args, kwargs)
        view = mask_view(mask, S, past)
        positions = sorted(events)
        experts = torch.stack([events[p][0] for p in positions], dim=1)            # [B*S, L, K]
        weights = torch.stack([events[p][1] for p in positions], dim=1)
        probs = torch.stack([events[p][2] for p in positions], dim=1) if self.probs else None
        self._hand_off(B, S, past, view, input_ids, experts, weights, probs, find_cache(args, kwargs))

    @torch.compiler.disable
    def _hand_off(self, B: int, S: int, past: Any, view: dict[str, torch.Tensor] | None,
                  input_ids: torch.Tensor | None, experts: torch.Tensor, weights: torch.Tensor,
                  probs: torch.Tensor | None, cache: Cache | None) -> None:
        """Queue one forward for the writer: device-to-host copies started, nothing waited on.

        The one place capture leaves a compiled graph (``torch.compiler.disable``)."""
        self.raise_writer_error()
        B, S = int(B), int(S)
        pending, self._pending_batch = self._pending_batch, None
        if pending is not None and pending["n"] is not None and (pending["n"] == 0 or B % pending["n"]):
            raise MoetraceError(
                f"capture.set_batch: expected {B} sequence ids for a batch of {B} rows (or B/k for k rows per "
                f"input: beams, returned sequences), got {pending['n']}")
        if pending is None and not self._described and self.store.label_names:
            raise _label_error(self.store.label_names[0], B)
        if cache is not None:
            self._follow_reorders(cache)
        on_cuda = experts.is_cuda
        def to_host(value: Any) -> Any:
            # copy=True: on CPU too, so a caller reusing its input buffer in place cannot change what is written.
            return value.detach().to("cpu", non_blocking=on_cuda, copy=True) if torch.is_tensor(value) else value

        item: dict[str, Any] = {"B": B, "S": S, "pending": pending,
                                "view": None if view is None else {k: to_host(v) for k, v in view.items()},
                                "interventions": active_interventions(self._routers)}
        for key, value in {"past": past, "token_id": input_ids, "experts": experts, "weights": weights,
                           "probs": probs}.items():
            item[key] = to_host(value)
        if on_cuda:
            # Non-blocking copies into pinned memory: the writer waits on this event before reading.
            item["copied"] = torch.cuda.Event()
            item["copied"].record()
        self._put(("forward", item))

    def _follow_reorders(self, cache: Cache) -> None:
        """Wrap ``cache.reorder_cache`` (public Cache API, used by beam search) so the writer
        sees every reordering of the batch rows; undone on exit."""
        if any(ref() is cache for ref, _ in self._wrapped):
            return  # wrapped once per cache, even when another capture wrapped it after this one
        previous = cache.__dict__.get("reorder_cache")
        original = cache.reorder_cache

        def reorder_cache(beam_idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._on_reorder(beam_idx)
            return original(beam_idx, *args, **kwargs)

        reorder_cache._moetrace_capture = self  # type: ignore[attr-defined]
        cache.reorder_cache = reorder_cache
        self._wrapped.append((weakref.ref(cache), previous))

    def _on_reorder(self, beam_idx: torch.Tensor) -> None:
        item: dict[str, Any] = {"beam_idx": beam_idx.detach().to("cpu", non_blocking=beam_idx.is_cuda)}
        if beam_idx.is_cuda:
            item["copied"] = torch.cuda.Event()
            item["copied"].record()
        self._put(("reorder", item))

    def _put(self, message: tuple[str, Any]) -> None:
        while True:
            self.raise_writer_error()
            try:
                self._queue.put(message, timeout=0.5)
                return
            except queue.Full:
                if not self._writer.is_alive():
                    self.raise_writer_error()
                    raise MoetraceError("capture writer thread stopped unexpectedly")

    # ------------------------------------------------------------------ writer thread
    def _write_loop(self) -> None:
        while True:
            kind, item = self._queue.get()
            if self._error is not None and kind != "stop":
                continue  # drain after a failure; the caller is told once
            try:
                if kind == "stop":
                    if self._error is None:
                        self._end_batch()
                    return
                if "copied" in item:
                    item["copied"].synchronize()
                if kind == "reorder":
                    if self._batch is not None:
                        self._batch.reorder(item["beam_idx"].numpy())
                else:
                    self._add_forward(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc
                self._batch = None
                if kind == "stop":
                    return

    def _fresh_seq(self, n: int) -> np.ndarray:
        """n sequence ids never used in the store nor by this capture."""
        seq = np.arange(self._next_seq, self._next_seq + n, dtype=np.int64)
        self._next_seq += n
        return seq

    def _new_batch(self, pending: dict[str, Any] | None, B: int, interventions: tuple) -> _Batch:
        if pending is None:
            if self.store.label_names:
                raise _label_error(self.store.label_names[0], B)
            return _Batch(B, self._fresh_seq(B), {}, 1, self._eos, interventions)
        n = B if pending["n"] is None else pending["n"]
        ids = pending["seq"]
        if ids is None:
            ids = self._fresh_seq(n)
        elif len(ids):
            self._next_seq = max(self._next_seq, int(ids.max()) + 1)
        return _Batch(B, ids, pending["labels"], B // n, self._eos, interventions)

    def _add_forward(self, item: dict[str, Any]) -> None:
        B, S = item["B"], item["S"]
        view = item["view"] and {k: v.numpy() if torch.is_tensor(v) else v for k, v in item["view"].items()}
        past = item["past"]
        if past is None:  # no cache: a 2-D mask wider than the tokens covers earlier ones
            past = view["keys"].shape[1] - S if view is not None and not view["keys_first"] else 0
        past = max(int(past), 0)
        if item["pending"] is not None or past == 0 or self._batch is None or self._batch.rows != B:
            self._end_batch()
            self._batch = self._new_batch(item["pending"], B, item["interventions"])
        token_ids = None if item["token_id"] is None else item["token_id"].numpy()
        step = self._batch.alignment.step(S, past, view, token_ids)
        keep = step.recorded.reshape(-1)
        n = int(keep.sum())
        columns = {
            "pos": step.pos.reshape(-1)[keep],
            "token_id": np.full(n, -1, dtype=np.int64) if token_ids is None else token_ids.reshape(-1)[keep],
            "generated": step.generated.reshape(-1)[keep],
            "experts": item["experts"].numpy()[keep],
        }
        if self.store.has_weights:
            columns["weights"] = item["weights"].float().numpy()[keep]
        if self.store.has_probs:
            columns["probs"] = item["probs"].float().numpy()[keep]
        self._batch.columns.append(columns)
        self._batch.owners.append(np.repeat(np.arange(B), S)[keep])

    def _end_batch(self) -> None:
        """Write the buffered batch: sequence after sequence, each in position order."""
        batch, self._batch = self._batch, None
        if batch is None or not batch.columns:
            return
        order, per_seq = batch.order()
        out = {name: np.concatenate([c[name] for c in batch.columns])[order] for name in batch.columns[0]}
        out["seq"] = np.repeat(batch.ids, per_seq)
        for name in self.store.label_names:
            out[name] = np.repeat(batch.labels[name], per_seq)
        if len(out["seq"]):
            self.store.append(out)
            self.store.note_interventions(batch.interventions, batch.ids)
            self.rows_captured += len(out["seq"])

    def close(self, raise_errors: bool = True) -> None:
        """Drain the writer, write the last batch and commit every row it accepted; then raise a writer error."""
        self._queue.put(_STOP)
        self._writer.join()
        for ref, previous in reversed(self._wrapped):
            cache = ref()
            if cache is not None:
                if previous is None:
                    cache.__dict__.pop("reorder_cache", None)
                else:
                    cache.reorder_cache = previous
        self._wrapped.clear()
        try:
            # append() validates a batch before buffering it, so the buffer holds only good rows.
            self.store.flush()
        except Exception:
            if self._error is None and raise_errors:
                raise
        if raise_errors:
            self.raise_writer_error()


def _tokenizer_name(tokenizer: Any) -> str | None:
    """What a store records of a tokenizer: its name or path (a string is taken as one)."""
    name = tokenizer if tokenizer is None or isinstance(tokenizer, str) else getattr(tokenizer, "name_or_path", None)
    if not name:
        return None
    return str(Path(name).resolve()) if Path(name).is_dir() else str(name)  # a local directory: from anywhere


def _open_store(store: TraceStore | str | Path, model: nn.Module, labels: Sequence[str], probs: bool,
                tokenizer: str | None = None) -> TraceStore:
    sites = router_sites(model)
    if not sites:
        raise MoetraceError(f"model {type(model).__name__}: no MoE router found to capture")
    spec = sites[0].spec
    layer_ids = [s.layer_id for s in sites]
    if isinstance(store, TraceStore):
        opened = store
        if opened.mode != "a":
            raise MoetraceError(f"{opened.path}: opened read-only; capture needs mode='a'")
    elif Path(store).exists():
        opened = TraceStore.open(store, mode="a")
    else:
        return TraceStore.create(
            store, n_layers=len(sites), n_experts=spec.n_experts, top_k=spec.top_k, layer_ids=layer_ids,
            labels=list(labels), model=getattr(getattr(model, "config", None), "_name_or_path", None)
            or type(model).__name__, scoring=spec.scoring + ("_renorm" if spec.renormalize else ""),
            tokenizer=tokenizer, weights=True, probs=probs)
    expected = (len(sites), spec.n_experts, spec.top_k, layer_ids)
    got = (opened.n_layers, opened.n_experts, opened.top_k, opened.layer_ids.tolist())
    if expected != got:
        raise MoetraceError(
            f"{opened.path}: store has (layers, experts, top_k, layer_ids) = {got}, "
            f"the model routes with {expected}")
    if probs != opened.has_probs:
        raise MoetraceError(
            f"{opened.path}: probs={probs} but the store {'has' if opened.has_probs else 'has no'} "
            f"routing/probs array; capture with probs={opened.has_probs}")
    return opened


@contextmanager
def capture(
    model: nn.Module,
    store: TraceStore | str | Path,
    labels: Sequence[str] | None = None,
    *,
    probs: bool = False,
    queue_size: int = 8,
    backend: str = "auto",
    tokenizer: Any = None,
) -> Iterator[Capture]:
    """Context manager recording the routing of every forward of ``model`` into ``store``.

    Args:
        model: a transformers MoE model of a supported family (``moetrace.models``).
        store: a TraceStore opened for append, or a path (opened, or created when absent with
            the model's layers, experts and top-k, routing weights, and ``labels`` as open
            vocabularies).
        labels: label names for a new store (values come per batch from ``set_batch``).
        probs: also record the full router distribution ``routing/probs`` [N, L, E].
        queue_size: forwards buffered between the model and the writer thread.
        tokenizer: the tokenizer of the token ids (or its name or path), recorded in a new store so
            later commands can show token text (:attr:`TraceStore.tokenizer`).
    Yields a :class:`Capture`. On exit the writer drains, the last batch is written, the store
    is flushed (rows committed), the hooks are removed, and a writer error is raised as
    MoetraceError. How forwards group into batches and sequences (generate(), decode loops,
    beam search: one coherent beam history per recorded sequence) is in the module docstring.
    """
    opened = _open_store(store, model, labels or [], probs, _tokenizer_name(tokenizer))
    cap = Capture(model, opened, probs, queue_size)
    pre = model.register_forward_pre_hook(cap.before_forward, with_kwargs=True)
    post = model.register_forward_hook(cap.after_forward, with_kwargs=True)
    failed = False
    try:
        with observe_routing(model, cap.on_route, backend=backend):
            yield cap
    except BaseException:
        failed = True
        raise
    finally:
        pre.remove()
        post.remove()
        cap.close(raise_errors=not failed)


def capture_texts(model: nn.Module, tokenizer, rows: Sequence[Mapping[str, Any]], store: TraceStore | str | Path,
                  labels: Sequence[str] = (), *, batch_size: int = 8, max_new_tokens: int = 0, probs: bool = False,
                  first_id: int = 0, overwrite: bool = False, progress: bool = True) -> Capture:
    """Capture ``rows`` (dicts with ``text`` or ``input_ids`` and every label) into ``store``.

    Row ``i`` becomes sequence ``first_id + i``; batches of ``batch_size`` rows are left-padded
    (so ``max_new_tokens > 0`` continues every row from its last real token with greedy
    ``generate``; the last generated token never goes through the model, so N new tokens record
    N - 1). ``tokenizer`` may be None when every row has ``input_ids``. An existing store at the
    path is appended to (``first_id`` must then be past its ids), or replaced with ``overwrite``
    (only when it is a trace store). A progress bar shows in a terminal and in a notebook.
    Returns the finished :class:`Capture` (``rows_captured``: T).
    """
    import shutil

    from moetrace.progress import tqdm

    if batch_size < 1:
        raise MoetraceError(f"batch_size: expected a positive integer, got {batch_size}")
    rows = list(rows)
    if not rows:
        raise MoetraceError("rows: expected at least one row with 'text' or 'input_ids', got none")
    for i, row in enumerate(rows):
        missing = [k for k in labels if k not in row]
        if ("text" not in row and "input_ids" not in row) or missing:
            what = f"label {missing[0]!r}" if missing else "'text' or 'input_ids'"
            raise MoetraceError(f"rows[{i}]: expected {what}, got keys {sorted(row)}")
        if "input_ids" not in row and tokenizer is None:
            raise MoetraceError(f"rows[{i}]: has 'text' but no tokenizer was given")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    if overwrite and not isinstance(store, TraceStore) and Path(store).exists():
        TraceStore.open(store).close()  # a trace store (else the error says what it is), never another directory
        shutil.rmtree(store)

    def encode(row: Mapping[str, Any]) -> list[int]:
        if "input_ids" in row:
            return [int(x) for x in row["input_ids"]]
        return tokenizer(row["text"], add_special_tokens=True)["input_ids"]

    with capture(model, store, labels=list(labels), probs=probs, tokenizer=tokenizer) as cap, torch.no_grad():
        for start in tqdm(range(0, len(rows), batch_size), disable=not progress, desc="capture", unit="batch"):
            batch = rows[start:start + batch_size]
            ids = [encode(r) for r in batch]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            cap.set_batch(seq=list(range(first_id + start, first_id + start + len(batch))),
                          labels={label: [str(r[label]) for r in batch] for label in labels})
            if max_new_tokens > 0:
                model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                               do_sample=False, pad_token_id=pad_id)
            else:
                model(input_ids=input_ids, attention_mask=mask)
    return cap
