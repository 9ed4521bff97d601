"""Shared plumbing of the analyses: layer selection, group codes, model inputs, expert modules, the
one writer of their files, and :class:`Analysis`, the declaration each analysis module makes."""

from __future__ import annotations

import argparse
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moetrace.errors import MoetraceError
from moetrace.evaluate import model_device
from moetrace.store import Chunk, TraceStore


def layer_positions(layer_ids: Sequence[int], layers: Sequence[int] | None, where: str = "--layers") -> list[int]:
    """Indices into ``layer_ids`` of the requested layer ids (all when ``layers`` is None)."""
    ids = [int(x) for x in layer_ids]
    if layers is None:
        return list(range(len(ids)))
    out = []
    for layer in layers:
        if int(layer) not in ids:
            raise MoetraceError(f"{where}: layer {layer} is not a recorded MoE layer (have {ids})")
        out.append(ids.index(int(layer)))
    return out


def row_range(store: TraceStore, num_tokens: int | None) -> tuple[int, int]:
    """Rows [0, min(num_tokens, N)) of the store."""
    n = len(store)
    if num_tokens is not None and num_tokens < 1:
        raise MoetraceError(f"--num-tokens: expected a positive integer, got {num_tokens}")
    return 0, n if num_tokens is None else min(n, int(num_tokens))


#: Rows an analysis works on at once: a store chunk can hold up to ~1e6 rows (the demo's grid), and
#: the float64 temporaries of a per-row computation over a [rows, L, E] block would then take GBs.
BLOCK_ROWS = 1 << 14


def blocks(chunks: Iterable[Chunk], block_rows: int = BLOCK_ROWS) -> Iterator[Chunk]:
    """The store chunks cut into consecutive blocks of at most ``block_rows`` rows (views, no copies)."""
    for chunk in chunks:
        for a in range(0, len(chunk), block_rows):
            b = min(len(chunk), a + block_rows)
            yield chunk if (a, b) == (0, len(chunk)) else \
                Chunk(chunk.start + a, chunk.start + b, {k: v[a:b] for k, v in chunk.columns.items()})


def group_codes(store: TraceStore, by: Sequence[str]) -> tuple[list[str], Any]:
    """(group names, f(chunk) -> int64 group code per row) for the cross product of labels ``by``.

    Group names join the label values with ``/`` (``math/en``); no labels: one group ``all``. The
    codes are the count driver's (:meth:`moetrace.counting.filters.Selection.group_codes`): a label
    code beyond the store's vocabulary is an error there, and so here.
    """
    from moetrace.counting.filters import Filters

    selection = Filters.of(by=list(by) or None).compile(store)
    vocabs = [selection.coords[label] for label in selection.by]
    names = ["/".join(parts) for parts in itertools.product(*vocabs)] if selection.by else ["all"]

    def codes(chunk) -> np.ndarray:
        return selection.group_codes(chunk.columns, len(chunk))

    return names, codes


def token_batches(input_ids: Sequence[Sequence[int]], batch_size: int = 8, num_tokens: int | None = None,
                  pad_id: int = 0, groups: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Left-padded batches of sequences until ``num_tokens`` real tokens are reached.

    Yields {"input_ids": LongTensor [B, S], "attention_mask": [B, S], "real": bool [B*S] (row-major,
    the real tokens), "groups": list of the group of each real token, "token_ids": int64 [n_real]}.
    The last sequence is cut so exactly ``num_tokens`` tokens are real (when there are enough).
    """
    if batch_size < 1:
        raise MoetraceError(f"--batch-size: expected a positive integer, got {batch_size}")
    left = None if num_tokens is None else int(num_tokens)
    batch: list[tuple[list[int], str]] = []
    for i, ids in enumerate(input_ids):
        if left is not None and left <= 0:
            break
        ids = [int(x) for x in ids]
        if left is not None:
            ids = ids[:left]
            left -= len(ids)
        if ids:
            batch.append((ids, groups[i] if groups is not None else "all"))
        if len(batch) == batch_size:
            yield _pad(batch, pad_id)
            batch = []
    if batch:
        yield _pad(batch, pad_id)


def _pad(batch: list[tuple[list[int], str]], pad_id: int) -> dict[str, Any]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x, _ in batch], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x, _ in batch], dtype=torch.long)
    real = mask.reshape(-1).bool().numpy()
    groups = np.repeat(np.asarray([g for _, g in batch], dtype=object), [len(x) for x, _ in batch]).tolist()
    return {"input_ids": ids, "attention_mask": mask, "real": real, "groups": groups,
            "token_ids": ids.reshape(-1).numpy()[real].astype(np.int64)}


def model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of a :func:`token_batches` batch on the model's device."""
    device = model_device(model)
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}


def experts_modules(model: nn.Module, layers: Sequence[int] | None = None) -> dict[int, tuple[nn.Module, int, int]]:
    """{layer id: (experts module, n_experts, top_k)} of the model's MoE layers (all or ``layers``).

    The experts module is the sibling ``experts`` of each router (transformers 5.x MoE blocks:
    ``forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])`` over fused 3-D
    expert parameters).
    """
    from moetrace.intervene import router_sites

    sites = router_sites(model)
    modules = dict(model.named_modules())
    ids = [s.layer_id for s in sites]
    out = {}
    for pos in layer_positions(ids, layers):
        site = sites[pos]
        parent = site.name.rsplit(".", 1)[0]
        experts = modules.get(f"{parent}.experts")
        if experts is None:
            raise MoetraceError(f"{parent}: MoE block of layer {site.layer_id} has no 'experts' module "
                                f"(children: {[n for n, _ in modules[parent].named_children()]})")
        out[site.layer_id] = (experts, site.spec.n_experts, site.spec.top_k)
    return out


def expert_outputs(experts: nn.Module, hidden: torch.Tensor, n_experts: int,
                   which: Sequence[int] | None = None) -> torch.Tensor:
    """Output of every expert (or those in ``which``) for every row of ``hidden`` [T, H]: [E', T, H].

    Calls the fused experts module with every token routed to expert e with weight 1, so the
    family's own expert code computes it (gated MLPs, biases, clamps included).
    """
    T = hidden.shape[0]
    which = list(range(n_experts)) if which is None else check_expert_ids(which, n_experts)
    return torch.stack([routed_outputs(experts, hidden, torch.full((T, 1), int(e), device=hidden.device))[:, 0]
                        for e in which])


def check_expert_ids(experts: Sequence[int], n_experts: int, what: str = "experts") -> list[int]:
    """``experts`` as distinct ints in [0, n_experts); MoetraceError naming the first that is not (the fused
    experts module would read memory outside its weights for an id out of range)."""
    ids = []
    for e in experts:
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 0 <= int(e) < n_experts:
            raise MoetraceError(f"{what}: expected expert ids in [0, {n_experts}), got {e!r}")
        if int(e) in ids:
            raise MoetraceError(f"{what}: expert {int(e)} is named twice")
        ids.append(int(e))
    return ids


def routed_outputs(experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Unweighted output of each row's routed experts: ``hidden [T, H]``, ``index [T, K]`` -> [T, K, H].

    One call of the fused experts module per rank k with each row sent to its own k-th expert with
    weight 1: K expert evaluations per row instead of the E of :func:`expert_outputs`.
    """
    weights = torch.ones((hidden.shape[0], 1), dtype=hidden.dtype, device=hidden.device)
    index = index.to(device=hidden.device, dtype=torch.long)
    return torch.stack([experts(hidden, index[:, k:k + 1], weights) for k in range(index.shape[1])], dim=1)


class LayerInputs:
    """Context manager recording the input rows and routed experts of the experts modules per forward.

    ``inputs[layer] = (hidden [T, H], top_k_index [T, K])`` of the last forward (detached).
    """

    def __init__(self, modules: Mapping[int, tuple[nn.Module, int, int]]):
        self.modules = modules
        self.inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks: list = []

    def __enter__(self) -> "LayerInputs":
        for layer, (module, _, _) in self.modules.items():
            def hook(mod, args, kwargs, layer=layer):
                values = list(args) + list(kwargs.values())
                self.inputs[layer] = (values[0].detach(), values[1].detach())
            self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def save_result(ds, path) -> None:
    """Write an analysis Dataset to a Zarr store (read back with :func:`load_result`)."""
    import warnings

    with warnings.catch_warnings():
        # consolidated metadata and fixed-width string coordinates are not yet in the Zarr v3 spec
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        warnings.filterwarnings("ignore", message="The data type .* does not have a Zarr V3 specification")
        ds.to_zarr(str(path), mode="w", consolidated=True)


def load_result(path):
    """An analysis Dataset written by :func:`save_result`, loaded into memory."""
    import xarray as xr

    if not Path(path).exists():
        raise MoetraceError(f"{path}: no such analysis result")
    return xr.open_zarr(str(path), consolidated=True).load()


def write_outputs(out: Path, name: str, fig=None, table=None, dataset=None, data: Any = None) -> list[Path]:
    """Write ``out/name.{csv,zarr,json,png,pdf}`` for the pieces given; returns the paths written.

    The one writer of an analysis' files, shared by the commands and :func:`moetrace.analysis.suite.run_suite`.
    """
    import json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if table is not None:
        table.to_csv(out / f"{name}.csv", index=False)
        written.append(out / f"{name}.csv")
    if dataset is not None:
        save_result(dataset, out / f"{name}.zarr")
        written.append(out / f"{name}.zarr")
    if data is not None:
        (out / f"{name}.json").write_text(json.dumps(data, indent=2))
        written.append(out / f"{name}.json")
    if fig is not None:
        for ext in ("png", "pdf"):
            fig.savefig(out / f"{name}.{ext}", dpi=120, bbox_inches="tight")
            written.append(out / f"{name}.{ext}")
    return written


def capture_probs(model, batches, path: str | Path) -> Path:
    """Capture the routing with full router distributions (``probs=True``) of ``batches``
    (:func:`token_batches`) into a new store at ``path``, one label ``group``."""
    import shutil

    from moetrace.capture import capture

    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    seq = 0
    with capture(model, path, labels=["group"], probs=True) as cap, torch.no_grad():
        for b in batches:
            lengths = b["attention_mask"].sum(1).tolist()
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int)
            cap.set_batch(seq=list(range(seq, seq + len(lengths))), labels={"group": [b["groups"][i] for i in starts]})
            seq += len(lengths)
            model(**model_inputs(model, b))
    return path


@dataclass
class SuiteRun:
    """What each analysis' ``suite`` step reads when :func:`moetrace.analysis.suite.run_suite` runs them
    all on one model: the model, its token sequences and groups, the store with ``routing/probs``, the
    layers, where to write."""

    model: nn.Module
    input_ids: Sequence[Sequence[int]]
    groups: Sequence[str]
    out: Path
    store: TraceStore
    layers: list[int]
    num_tokens: int
    batch_size: int
    pad_id: int
    decode: Callable[[Sequence[int]], str] | None
    method: str

    def batches(self) -> Iterator[dict[str, Any]]:
        """The first ``num_tokens`` tokens as padded batches (:func:`token_batches`), afresh each call."""
        return token_batches(self.input_ids, batch_size=self.batch_size, num_tokens=self.num_tokens,
                             pad_id=self.pad_id, groups=self.groups)

    @property
    def first_layer(self) -> int:
        return self.layers[0]

    @functools.cached_property
    def busiest_experts(self) -> list[int]:
        """The experts of the first layer, most often selected first (the profile and steering show them)."""
        counts = np.zeros(self.store.n_experts, dtype=np.int64)
        pos = self.store.layer_ids.tolist().index(self.first_layer)
        for chunk in self.store.iter_chunks(["experts"]):
            counts += np.bincount(chunk["experts"][:, pos, :].ravel().astype(np.int64), minlength=self.store.n_experts)
        return np.argsort(-counts, kind="stable").tolist()

    @property
    def busiest_expert(self) -> int:
        return self.busiest_experts[0]


@dataclass(frozen=True)
class Analysis:
    """One seed-003 analysis, declared in its module as ``ANALYSIS`` beside its computation;
    :data:`moetrace.analysis.ANALYSES` collects them and the command line, :mod:`moetrace.figures`,
    the report and :func:`moetrace.analysis.suite.run_suite` derive from that list.

    command: the ``moetrace`` subcommand; help: its one line in ``moetrace --help``;
    example: a command line (without ``moetrace``) that works from a directory holding
    ``run/trace.zarr`` (captured from the demo model with ``--probs`` and labels ``domain,lang``):
    shown in the command's help and run verbatim by the tests;
    arguments: adds the command's options to its ``argparse`` parser; run: ``args -> exit code``;
    outputs: glob patterns of the files the command writes into ``--out`` (the tests check each);
    figures: public name in :mod:`moetrace.figures` -> figure function;
    section: its report section (owning the file names it reads), or None;
    suite: its step in ``run_suite`` (a :class:`SuiteRun` -> files written), or None;
    order: its place among the analyses (command list, report page, suite).
    """

    command: str
    help: str
    example: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    outputs: tuple[str, ...]
    order: int
    figures: Mapping[str, Callable] = field(default_factory=dict)
    section: Any = None  # moetrace.sections.Section
    suite: Callable[[SuiteRun], list[Path]] | None = None
