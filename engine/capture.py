"""Record the routing of a transformers MoE model into a TraceStore while it runs.

    with capture(model, "trace.zarr", labels=["domain"]) as cap:
        cap.set_batch(seq=[0, 1], labels={"domain": ["math", "code"]})
        model(input_ids, attention_mask=mask)            # or model.generate(...)

For every forward pass, every non-padding token becomes one store row: its sequence id,
position (counted over the non-padding tokens of its row), token id, whether it was
generated (the forwards after the first one of a batch, i.e. generate's decoding steps),
the batch row's labels, and for every MoE layer the experts in rank order and their
weights (optionally the full router distribution).

The routing comes from ``engine.intervene.observe_routing``, so capture composes with
``intervene``: capturing while ablating records the routing actually used. The forward
only stacks the per-layer tensors and starts their device-to-host copies; converting them
and writing Zarr happen in a background writer thread fed by a bounded queue. An error in
the writer is raised in the caller (at the next forward or on exit), and every row the
writer had committed stays readable.
"""

from __future__ import annotations

import queue
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from engine.errors import MoetraceError
from engine.intervene import RouteEvent, observe_routing, router_sites
from engine.store import TraceStore

_STOP = object()


class Capture:
    """The object ``capture(...)`` yields; call :meth:`set_batch` before each batch."""

    def __init__(self, model: nn.Module, store: TraceStore, probs: bool, queue_size: int):
        self.model = model
        self.store = store
        self.probs = probs
        sites = router_sites(model)
        self._positions = {site.position: site.layer_id for site in sites}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._events: list[RouteEvent] = []
        self._pending_batch: dict[str, Any] | None = None
        self._current: dict[str, Any] | None = None
        # Automatic sequence ids continue after every id the (possibly pre-existing) store holds;
        # read once here, before the writer thread touches the store.
        top = [int(c["seq"].max()) for c in store.iter_chunks(["seq"]) if len(c)]
        self._next_seq = max(top) + 1 if top else 0
        self._past: int | None = None
        self.rows_captured = 0
        self._writer = threading.Thread(target=self._write_loop, name="moetrace-capture-writer", daemon=True)
        self._writer.start()

    # ------------------------------------------------------------------ user API
    def set_batch(
        self,
        seq: Sequence[int] | np.ndarray | None = None,
        labels: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Describe the rows of the next batch: ``seq`` ids [B] and label values per row [B].

        Applies to the next forward and to the decoding steps that continue it (generate).
        Without a call, each batch row of a new forward gets a fresh sequence id; a store
        with labels then needs them, so call this whenever the store has labels.
        """
        self.raise_writer_error()
        self._pending_batch = {
            "seq": None if seq is None else np.asarray(seq, dtype=np.int64),
            "labels": {k: np.asarray(v) for k, v in (labels or {}).items()},
        }

    def raise_writer_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise MoetraceError(f"capture writer failed for {self.store.path}: {error}") from error

    # ------------------------------------------------------------------ hooks
    def on_route(self, event: RouteEvent) -> None:
        self._events.append(event)

    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.raise_writer_error()
        self._events = []
        # Tokens already in the KV cache, read before this forward extends it. generate()
        # drops an all-ones attention mask, so the cache is the reliable source.
        cache = kwargs.get("past_key_values")
        self._past = int(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else None

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        events, self._events = self._events, []
        if not events:
            return
        input_ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        embeds = kwargs.get("inputs_embeds")
        shape = input_ids.shape if input_ids is not None else embeds.shape[:2]
        B, S = int(shape[0]), int(shape[1])
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and torch.is_tensor(args[1]):
            mask = args[1]  # model(input_ids, attention_mask) called positionally
        past = self._past
        if mask is not None and mask.dim() == 2:
            past = int(mask.shape[1]) - S if past is None else past
            full = mask.to(torch.int64)[:, -(past + S):]
        else:
            cache_position = kwargs.get("cache_position")
            if past is None:
                past = int(cache_position.reshape(-1)[0]) if cache_position is not None and cache_position.numel() else 0
            full = torch.ones(B, past + S, dtype=torch.int64, device=events[0].experts.device)
        batch = self._batch_for(B, continuation=past > 0)
        valid = full[:, -S:].bool()                                  # [B, S]
        pos = (full.cumsum(dim=1) - 1)[:, -S:]                       # non-padding positions
        events = sorted(events, key=lambda e: e.position)
        if [e.position for e in events] != sorted(self._positions):
            raise MoetraceError(
                f"capture: expected one routing event per MoE layer {sorted(self._positions)} in a "
                f"forward, got positions {[e.position for e in events]}")
        flat_valid = valid.reshape(-1)
        item = {
            "valid": valid,
            "pos": pos,
            "token_id": None if input_ids is None else input_ids,
            "experts": torch.stack([e.experts for e in events], dim=1)[flat_valid],     # [n, L, K]
            "weights": torch.stack([e.weights for e in events], dim=1)[flat_valid],
            "probs": (torch.stack([e.probs() for e in events], dim=1)[flat_valid] if self.probs else None),
            "generated": past > 0,
            "batch": batch,
        }
        on_cuda = item["experts"].is_cuda
        for key in ("valid", "pos", "token_id", "experts", "weights", "probs"):
            if item[key] is not None:
                item[key] = item[key].detach().to("cpu", non_blocking=on_cuda)
        if on_cuda:
            # Non-blocking copies into pinned memory: the writer waits on this event before reading.
            item["copied"] = torch.cuda.Event()
            item["copied"].record()
        self._put(item)

    # ------------------------------------------------------------------ internals
    def _fresh_seq(self, B: int) -> np.ndarray:
        """B sequence ids never used in the store nor by this capture."""
        seq = np.arange(self._next_seq, self._next_seq + B, dtype=np.int64)
        self._next_seq += B
        return seq

    def _batch_for(self, B: int, continuation: bool) -> dict[str, Any]:
        if self._pending_batch is not None:
            batch, self._pending_batch = self._pending_batch, None
            if batch["seq"] is None:
                batch["seq"] = self._fresh_seq(B)
            elif len(batch["seq"]):
                self._next_seq = max(self._next_seq, int(batch["seq"].max()) + 1)
            self._current = batch
        elif not continuation or self._current is None:
            self._current = {"seq": self._fresh_seq(B), "labels": {}}
        batch = self._current
        if len(batch["seq"]) != B:
            raise MoetraceError(f"capture.set_batch: expected {B} sequence ids for a batch of {B} rows, "
                                f"got {len(batch['seq'])}")
        for name in self.store.label_names:
            values = batch["labels"].get(name)
            if values is None or len(values) != B:
                raise MoetraceError(
                    f"capture: the store has label {name!r}; expected set_batch(labels={{{name!r}: [{B} values]}}) "
                    f"before this forward, got {None if values is None else len(values)} values")
        return batch

    def _put(self, item: dict[str, Any]) -> None:
        while True:
            self.raise_writer_error()
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                if not self._writer.is_alive():
                    self.raise_writer_error()
                    raise MoetraceError("capture writer thread stopped unexpectedly")

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain after a failure; the caller is told once
            try:
                self._write(item)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                self._error = exc

    def _write(self, item: dict[str, Any]) -> None:
        if "copied" in item:
            item["copied"].synchronize()
        valid = item["valid"].numpy()
        n = int(valid.sum())
        if n == 0:
            return
        rows_of = np.nonzero(valid)[0]                                  # batch row of each token
        batch = item["batch"]
        out = {
            "seq": batch["seq"][rows_of],
            "pos": item["pos"].numpy()[valid],
            "token_id": (np.full(n, -1) if item["token_id"] is None else item["token_id"].numpy()[valid]),
            "generated": np.full(n, item["generated"], dtype=bool),
            "experts": item["experts"].numpy(),
        }
        if self.store.has_weights:
            out["weights"] = item["weights"].float().numpy()
        if self.store.has_probs:
            out["probs"] = item["probs"].float().numpy()
        for name in self.store.label_names:
            out[name] = np.asarray(batch["labels"][name])[rows_of]
        self.store.append(out)
        self.rows_captured += n

    def close(self, raise_errors: bool = True) -> None:
        """Drain the writer and commit every row it accepted; then raise a writer error."""
        self._queue.put(_STOP)
        self._writer.join()
        try:
            # append() validates a batch before buffering it, so the buffer holds only good rows.
            self.store.flush()
        except Exception:
            if self._error is None and raise_errors:
                raise
        if raise_errors:
            self.raise_writer_error()


def _open_store(store: TraceStore | str | Path, model: nn.Module, labels: Sequence[str], probs: bool) -> TraceStore:
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
            weights=True, probs=probs)
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
) -> Iterator[Capture]:
    """Context manager recording the routing of every forward of ``model`` into ``store``.

    Args:
        model: a transformers MoE model of a supported family (``engine.models``).
        store: a TraceStore opened for append, or a path (opened, or created when absent with
            the model's layers, experts and top-k, routing weights, and ``labels`` as open
            vocabularies).
        labels: label names for a new store (values come per batch from ``set_batch``).
        probs: also record the full router distribution ``routing/probs`` [N, L, E].
        queue_size: forwards buffered between the model and the writer thread.
    Yields a :class:`Capture`. On exit the writer drains, the store is flushed (rows
    committed), the hooks are removed, and a writer error is raised as MoetraceError.
    """
    opened = _open_store(store, model, labels or [], probs)
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
