"""Import per-request routing arrays (``[tokens, layers, top_k]`` expert ids) from serving/training engines.

``moetrace import-routed SRC OUT.zarr --format F``: every format is a module in
``engine/io`` with a ``read(src, top_k=None)`` generator of :class:`Request` (one
sequence each) and a ``HELP`` line, registered in :data:`FORMATS` (the one place; the
CLI's ``--format`` choices and the tests derive from it):

- ``npy`` (:mod:`moetrace.io.npy`): a directory of ``.npy`` files, one sequence each;
- ``vllm`` (:mod:`moetrace.io.vllm`): vLLM OpenAI-server responses (``prompt_routed_experts`` /
  ``choices[i].routed_experts``), one JSON per line;
- ``sglang`` (:mod:`moetrace.io.sglang`): SGLang ``/generate`` responses (``meta_info.routed_experts``,
  base64 of int32), one JSON per line;
- ``megatron`` (:mod:`moetrace.io.megatron`): Megatron-LM ``--moe-routing-trace-path`` JSONL files.

The shared part (this module): every request becomes one sequence (``seq`` = 0, 1, ... in
reading order, ``pos`` = 0, 1, ... within it), prompt and generated tokens are marked in
``tokens/generated``; expert ids are range-checked in their source dtype (0 <= id <
``n_experts``; ``n_experts`` = largest id + 1 unless given) and every request must have
the same layers and top-k; labels come from fields of the record (``label_fields``) and/or
a side file (``labels_file``: CSV or JSONL with a ``request_id`` column/key and one
column per label). Errors are one line naming the file (and line / token row).

Layers: a token's top-k must hold K distinct expert ids (the store's invariant). Engines that
allocate their routing buffers over every decoder layer (SGLang, one vLLM version) leave the
model's dense layers all zeros: a layer whose every id is 0 in every token of the source is such
a dense layer when K >= 2 (K zeros are K equal ids, never a routing) and is dropped; any other
repeated id is an error naming the file, row and layer. Layer ids are then the kept layers'
indices in the source, unless ``layer_ids`` (``--layer-ids 1,2,...``) names them or ``config``
(``--config config.json``, the model's transformers config) gives the model's MoE layers
(:func:`moe_layer_ids`): a source with one layer per decoder layer keeps exactly those, a source
with one layer per MoE layer (newer vLLM, which indexes MoE layers 0, 1, ...) is mapped onto them.
A format may drop rows its engine leaves unfilled (vLLM's -1 fill value) and says how many; the
kept rows keep their position in the request.

The source is read twice (pass 1 validates and finds ``n_experts``, pass 2 writes), one
request at a time: memory is bounded by the largest request (Megatron: by one file).
"""

from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.io.base import MAX_EXPERTS, TOKEN_ID_RANGE, check_range, resolve_n_experts, write_store
from moetrace.jsonl import read_json_objects, short
from moetrace.progress import tqdm

#: format name -> module implementing ``read(src, top_k=None) -> Iterator[Request]`` and ``HELP``.
FORMATS = {"npy": "moetrace.io.npy", "vllm": "moetrace.io.vllm", "sglang": "moetrace.io.sglang",
           "megatron": "moetrace.io.megatron"}
#: Rows collected before one ``TraceStore.append``.
BATCH_ROWS = 1 << 16


@dataclasses.dataclass
class Request:
    """One request (one sequence) read from a source.

    ``where``: the file (and line) for error messages; ``key``: the request id, looked up
    in the labels side file; ``experts``: integer array [T, L, K] in its source dtype;
    ``generated``: bool [T] or None (all prompt); ``token_id``: int [T] or None (unknown:
    -1); ``fields``: the record's fields usable as labels; ``layer_ids``: the model's
    index of each of the L layers, when the source states them (else 0..L-1); ``pos``: the
    rows' positions when some were dropped (``dropped`` of them); ``rank_order``: ``"ranked"``
    (rank 0 first) or ``"unknown"`` (the source gives each token's set of experts, not their
    order: the store's rank order is then unknown); ``unsettled``: tokens whose rank order the
    source's scores do not settle (equal, or within their rounding).
    """

    where: str
    key: str
    experts: np.ndarray
    generated: np.ndarray | None = None
    token_id: np.ndarray | None = None
    fields: dict = dataclasses.field(default_factory=dict)
    layer_ids: list[int] | None = None
    pos: np.ndarray | None = None
    dropped: int = 0
    rank_order: str = "ranked"
    unsettled: int = 0


def format_module(name: str):
    """The module implementing format ``name``; MoetraceError listing the formats when unknown."""
    if name not in FORMATS:
        raise MoetraceError(f"--format: expected one of {', '.join(FORMATS)}, got {name!r}")
    return importlib.import_module(FORMATS[name])


def import_routed(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str,
    n_experts: int | None = None,
    top_k: int | None = None,
    label_fields: list[str] | tuple = (),
    labels_file: str | os.PathLike | None = None,
    model: str | None = None,
    layer_ids: list[int] | tuple | None = None,
    config: str | os.PathLike | None = None,
    options: dict | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> "TraceStore":  # noqa: F821
    """Import ``src`` in ``format`` (a key of :data:`FORMATS`) into a new store at ``out``.

    Writes one sequence per request: ``tokens/seq`` int64 (request index in reading
    order), ``tokens/pos`` int32 (0, 1, ... within the request), ``tokens/token_id``
    (-1 where the source has none), ``tokens/generated``, one label per
    ``label_fields`` name and per ``labels_file`` column, ``routing/experts`` [N, L, K];
    and per sequence (``sequences/``, :meth:`TraceStore.read_sequences`) its ``request_id`` and
    ``source`` (the file, and line where the format has lines, it was read from).
    ``top_k``: needed by formats whose arrays are flat (SGLang). ``layer_ids`` / ``config``:
    the model's layer ids of the source's MoE layers (module docstring; at most one of the
    two). ``options``: the format's own options (its module's ``OPTIONS``, e.g. Megatron's
    ``block`` and ``micro_batch_size``). Returns the store opened read-only; MoetraceError
    naming the file/line/row on bad input, leaving nothing at ``out``.

    Rank order: the store's ``rank_order`` is ``"unknown"`` when a request's is (and K >= 2).
    """
    module = format_module(format)
    options = dict(options or {})
    unknown = sorted(set(options) - set(getattr(module, "OPTIONS", {})))
    if unknown:
        raise MoetraceError(f"--format {format}: no option {', '.join(unknown)} (it has "
                            f"{', '.join(getattr(module, 'OPTIONS', {})) or 'none'})")
    src = Path(src)
    if not src.exists():
        raise MoetraceError(f"{src}: no such file or directory")
    side = _read_labels_file(Path(labels_file)) if labels_file is not None else None
    label_names = list(label_fields) + (side[0] if side else [])
    if len(set(label_names)) != len(label_names):
        raise MoetraceError(f"labels: a label is named twice ({label_names})")

    if layer_ids is not None and config is not None:
        raise MoetraceError("--layer-ids, --config: give at most one of them")
    moe_ids = moe_layer_ids(config) if config is not None else None

    shape = None
    max_expert = -1
    n_requests = dropped = 0
    all_zero = repeated = None
    unranked, unsettled = False, 0
    for req in tqdm(module.read(src, top_k=top_k, **options), desc="scan", unit="request", disable=not progress):
        shape = _check(req, shape, n_experts)
        if req.experts.size:
            max_expert = max(max_expert, int(req.experts.max()))
            zero, first = _layer_scan(req)
            all_zero = zero if all_zero is None else all_zero & zero
            repeated = first if repeated is None else [r or f for r, f in zip(repeated, first)]
        _labels(req, label_fields, side)
        n_requests += 1
        dropped += req.dropped
        unsettled += req.unsettled
        unranked |= req.rank_order != "ranked"
    if shape is None or all_zero is None:
        raise MoetraceError(f"{src}: no requests with routing found")
    L, K = shape[0][1:]
    keep, ids = _layers(src, L, K, shape[2], all_zero, repeated, layer_ids, moe_ids, config)
    if dropped:
        warnings.warn(f"{src}: dropped {dropped} row(s) the engine left unfilled (format {format}); the other "
                      "rows keep their positions", stacklevel=2)
    n_experts = resolve_n_experts(max_expert, n_experts, str(src), K)
    rank_order = "unknown" if unranked and K > 1 else "ranked"
    if rank_order == "unknown":
        warnings.warn(f"{src}: the source gives each token's set of experts, not their rank order (format "
                      f"{format}; see its docs): the store records rank order as unknown, and statistics that "
                      "need the top-1 will refuse it", stacklevel=2)
    if unsettled:
        warnings.warn(f"{src}: in {unsettled} token-layer top-k(s) the recorded router scores cannot settle the rank "
                      "order (scores equal or within the source's rounding); ranked by the rounded scores, equal "
                      "ones by expert id", stacklevel=2)

    def batches():
        pending: list[dict] = []
        sources: dict[str, list] = {"seq": [], "request_id": [], "source": []}  # where each sequence came from
        rows = 0
        for seq, req in enumerate(tqdm(module.read(src, top_k=top_k, **options), desc="import", unit="request",
                                       disable=not progress, total=n_requests)):
            T = len(req.experts)
            pos = np.arange(T, dtype=np.int32) if req.pos is None else np.asarray(req.pos, dtype=np.int32)
            batch = {"seq": np.full(T, seq, dtype=np.int64), "pos": pos,
                     "experts": req.experts[:, keep].astype(np.int64),
                     "generated": np.zeros(T, bool) if req.generated is None else np.asarray(req.generated, bool),
                     "token_id": (np.full(T, -1, np.int32) if req.token_id is None
                                  else np.asarray(req.token_id).astype(np.int32))}
            for name, value in _labels(req, label_fields, side).items():
                batch[name] = np.full(T, value)
            pending.append(batch)
            for column, value in zip(sources, (seq, req.key, _relative(req.where, src))):
                sources[column].append(value)
            rows += T
            if rows >= BATCH_ROWS:
                yield {**_concat(pending), "sequences": {k: np.asarray(v) for k, v in sources.items()}}
                pending, rows = [], 0
                sources = {k: [] for k in sources}
        if pending:
            yield {**_concat(pending), "sequences": {k: np.asarray(v) for k, v in sources.items()}}

    return write_store(out, batches(), overwrite=overwrite, inputs=(src,), n_layers=len(keep), n_experts=n_experts,
                       top_k=K, layer_ids=ids, labels=label_names, model=model, chunk_rows=chunk_rows,
                       rank_order=rank_order)


def _relative(where: str, src: Path) -> str:
    """``where`` (a file, and maybe its line) relative to the import's source directory, so a store does
    not record the machine's paths (a single-file source keeps its file name)."""
    root = str(src if src.is_dir() else src.parent).rstrip("/") + "/"
    return where[len(root):] if where.startswith(root) else where


def _layer_scan(req: Request) -> tuple[np.ndarray, list]:
    """(bool [L]: the layer's ids are all 0 in this request, per layer the first "where: row r"
    with a repeated id in one token's top-k, or None)."""
    experts = req.experts
    zero = (experts == 0).all(axis=(0, 2))
    first: list = [None] * experts.shape[1]
    if experts.shape[2] > 1:
        ordered = np.sort(experts, axis=2)
        rep = (ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2)  # [T, L]
        for layer in np.flatnonzero(rep.any(axis=0)):
            t = int(np.argmax(rep[:, layer]))
            first[layer] = f"{req.where}: row {t}, layer {layer}: expected {experts.shape[2]} distinct expert ids " \
                           f"in a token's top-k, got {experts[t, layer].tolist()}"
    return zero, first


def _layers(src: Path, L: int, K: int, source_ids, all_zero: np.ndarray, repeated: list, layer_ids, moe_ids,
            config) -> tuple[np.ndarray, list[int]]:
    """(source layer positions to keep, their model layer ids): dense layers dropped, ids mapped
    (module docstring). MoetraceError when a kept layer repeats an id or the mapping does not fit."""
    dense = all_zero if K > 1 else np.zeros(L, bool)
    if moe_ids is not None and L == moe_ids[1]:  # one source layer per decoder layer
        wanted = np.zeros(L, bool)
        wanted[moe_ids[0]] = True
        routed = np.flatnonzero(~wanted & ~dense)
        if len(routed):
            raise MoetraceError(f"{config}: layer {int(routed[0])} is a dense layer of this model, but {src} routes "
                                "tokens there: the config does not describe the traced model")
        dense = ~wanted
    keep = np.flatnonzero(~dense)
    if len(keep) == 0:
        raise MoetraceError(f"{src}: every layer's expert ids are all 0: no routing recorded")
    for layer in keep:
        if repeated[layer] is not None:
            raise MoetraceError(repeated[layer])
    base = list(range(L)) if source_ids is None else list(source_ids)
    ids = [int(base[i]) for i in keep]
    if layer_ids is not None:
        ids = [int(x) for x in layer_ids]
        if len(ids) != len(keep):
            raise MoetraceError(f"--layer-ids: expected {len(keep)} ids (the MoE layers of {src}), got {len(ids)}")
    elif moe_ids is not None:
        if len(moe_ids[0]) != len(keep):
            raise MoetraceError(f"{config}: the model has {len(moe_ids[0])} MoE layers of {moe_ids[1]}, {src} has "
                                f"{len(keep)} routed layers: the config does not describe the traced model")
        ids = list(moe_ids[0])
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise MoetraceError(f"layer ids: expected distinct non-negative ids, got {ids}")
    return keep, ids


def moe_layer_ids(config: str | os.PathLike | dict) -> tuple[list[int], int]:
    """(the MoE layers' indices, the number of decoder layers) from a transformers config.

    Reads ``num_hidden_layers`` and the fields by which transformers' MoE families place their
    dense layers: ``first_k_dense_replace`` (DeepSeek-V2/V3, Kimi-K2, GLM-4.5: layers below it
    are dense), ``moe_layer_freq`` (DeepSeek's own code: MoE where ``i % freq == 0``),
    ``decoder_sparse_step`` and ``mlp_only_layers`` (Qwen2/3-MoE: MoE where ``(i + 1) % step ==
    0`` and ``i`` is not listed). A config nested under ``text_config`` is read there.
    """
    if not isinstance(config, dict):
        path = Path(config)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MoetraceError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MoetraceError(f"{path}: expected a transformers config.json, got invalid JSON ({exc})") from None
        where = str(path)
    else:
        where = "config"
    if "num_hidden_layers" not in config and isinstance(config.get("text_config"), dict):
        config = config["text_config"]
    n = config.get("num_hidden_layers")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise MoetraceError(f"{where}: expected a positive num_hidden_layers, got {n!r}")
    first = int(config.get("first_k_dense_replace") or 0)
    freq = int(config.get("moe_layer_freq") or 1)
    step = int(config.get("decoder_sparse_step") or 1)
    mlp_only = {int(i) for i in config.get("mlp_only_layers") or []}
    ids = [i for i in range(n) if i >= first and i % freq == 0 and (i + 1) % step == 0 and i not in mlp_only]
    if not ids:
        raise MoetraceError(f"{where}: no MoE layer among its {n} layers")
    return ids, n


def _concat(batches: list[dict]) -> dict:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def _check(req: Request, shape, n_experts: int | None):
    """Validate one request against the first one's shape ``((T, L, K), where)``; return the shape."""
    experts = req.experts
    if experts.dtype.kind not in "iu":
        raise MoetraceError(f"{req.where}: expected an integer array of expert ids, got dtype {experts.dtype}")
    if experts.ndim != 3 or experts.shape[1] < 1 or experts.shape[2] < 1:
        raise MoetraceError(f"{req.where}: expected an array [tokens, layers, top_k], got shape {experts.shape}")
    T = len(experts)
    if shape is not None and (experts.shape[1:] != shape[0][1:] or req.layer_ids != shape[2]):
        raise MoetraceError(f"{req.where}: [layers, top_k] = {list(experts.shape[1:])} (layer ids "
                            f"{req.layer_ids}), expected {list(shape[0][1:])} (layer ids {shape[2]}) like {shape[1]}")
    hi = MAX_EXPERTS - 1 if n_experts is None else n_experts - 1
    flat = experts.reshape(T, experts.shape[1] * experts.shape[2])  # T may be 0
    bad = (flat < 0) | (flat > hi)  # compared in the source dtype: nothing wraps
    if bad.any():
        t, j = np.unravel_index(int(np.argmax(bad)), bad.shape)
        layer, rank = divmod(int(j), experts.shape[2])
        hint = f" (n_experts={n_experts})" if n_experts is not None else " (a store holds at most 65536 experts)"
        raise MoetraceError(f"{req.where}: row {int(t)} (token {int(t)}), layer {layer}, rank {rank}: expected an "
                            f"expert id in [0, {hi}]{hint}, got {flat[t, j].item()}")
    for name, values in (("generated", req.generated), ("token_id", req.token_id)):
        if values is not None and len(values) != T:
            raise MoetraceError(f"{req.where}: {name}: expected {T} values (one per token), got {len(values)}")
    if req.token_id is not None:
        token_id = np.asarray(req.token_id)
        if token_id.dtype.kind not in "iu":
            raise MoetraceError(f"{req.where}: token ids: expected integers, got dtype {token_id.dtype}")
        check_range(req.where, "token_id", token_id, *TOKEN_ID_RANGE, 0, what="a token id",
                    hint=" (tokens/token_id is int32; -1 = unknown)")
    return (experts.shape, req.where, req.layer_ids) if shape is None else shape


def _labels(req: Request, label_fields, side) -> dict[str, str]:
    """Label values of one request: record fields, then side-file columns."""
    out = {}
    for name in label_fields:
        if name not in req.fields or req.fields[name] is None:
            raise MoetraceError(f"{req.where}: label field {name!r} missing (fields: {sorted(req.fields)})")
        value = req.fields[name]
        if isinstance(value, (dict, list)):
            raise MoetraceError(f"{req.where}: label field {name!r}: expected a string or number, got {short(value)}")
        out[name] = str(value)
    if side is not None:
        names, table, path = side
        if req.key not in table:
            raise MoetraceError(f"{path}: no row with request_id {req.key!r} (needed by {req.where})")
        out.update(zip(names, table[req.key]))
    return out


def _read_labels_file(path: Path) -> tuple[list[str], dict[str, list[str]], Path]:
    """``(label names, request_id -> values, path)`` from a CSV (header row) or JSONL labels file."""
    if not path.is_file():
        raise MoetraceError(f"{path}: no such labels file")
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            if path.suffix in (".jsonl", ".json", ".ndjson"):
                rows = [row for _, row in read_json_objects(path)]
            else:
                rows = list(csv.DictReader(fh))
    except UnicodeDecodeError:
        raise MoetraceError(f"{path}: not UTF-8 text") from None
    names: list[str] = []
    for row in rows:
        names += [k for k in row if k != "request_id" and k not in names]
    table: dict[str, list[str]] = {}
    for i, row in enumerate(rows, 1):
        if row.get("request_id") in (None, ""):
            raise MoetraceError(f"{path}: row {i}: expected a request_id, got {short(row)}")
        key = str(row["request_id"])
        if key in table:
            raise MoetraceError(f"{path}: row {i}: request_id {key!r} appears twice")
        missing = [n for n in names if row.get(n) is None]
        if missing:
            raise MoetraceError(f"{path}: row {i} (request_id {key!r}): missing label(s) {missing}")
        table[key] = [str(row[n]) for n in names]
    if not names:
        raise MoetraceError(f"{path}: expected a request_id column and at least one label column")
    return names, table, path




def source_files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """``src`` itself when a file, else its files with one of ``suffixes``, sorted by name."""
    if src.is_file():
        return [src]
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if not files:
        raise MoetraceError(f"{src}: no {' / '.join(suffixes)} files")
    return files


def int_array(value: Any, where: str, what: str, ndim: int) -> np.ndarray:
    """A nested JSON list of integers as an array of ``ndim`` dimensions; one-line error otherwise."""
    ok = isinstance(value, list)
    if ok:
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged
            ok = False
    if not ok or arr.ndim != ndim or (arr.size and arr.dtype.kind not in "iu"):
        shape = "[tokens, layers, top_k]" if ndim == 3 else f"a {ndim}-d list"
        raise MoetraceError(f"{where}: {what}: expected integers as {shape}, got {short(value)}")
    return arr if arr.size else arr.astype(np.int64)
