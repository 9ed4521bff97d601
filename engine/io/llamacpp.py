"""Import llama.cpp expert traces (seed 002's format) into a :class:`TraceStore`.

Input layout: ``DIR/<domain>/traces/token-NNNNN.json``. Each file is a JSON object with
an ``entries`` list, one entry per traced ggml operation, for example::

    {"token_index": 3, "n_tokens": 1, "entries": [
      {"entry_id": 17, "timestamp_ns": 1731600000123, "operation_type": "MUL_MAT_ID",
       "layer_id": 0, "dst_name": "ffn_moe_gate-0", "dst_ne": [768, 4, 1, 1],
       "sources": [{"name": "blk.0.ffn_gate_exps.weight", "ne": [2048, 768, 32, 1]},
                   {"name": "ffn_moe_input-0", "ne": [2048, 1, 1, 1]},
                   {"name": "ffn_moe_topk-0", "ne": [4, 1, 1, 1]}],
       "expert_ids": [9, 5, 24, 3]},
      ...]}

Rules:

- Only entries with ``operation_type == "MUL_MAT_ID"`` and a non-empty ``expert_ids``
  carry routing, for the layer ``layer_id``. ``expert_ids`` is the flattened ggml ids
  tensor (``ne = [K, n_tokens]``): token-major, ``K`` ids per token, rank 0 first.
- A layer's gate/up/down entries (``dst_name`` ``ffn_moe_gate-<il>``, ``ffn_moe_up-<il>``,
  ``ffn_moe_down-<il>``) repeat the same ids: they are imported once, and any
  disagreement is an error naming the file and layer. The components are told apart by
  ``dst_name`` with its ``-<layer>`` suffix removed.
- An entry may hold several tokens (a prompt batch): every token is imported, not only
  the first ``K`` ids. A file may also hold several calls of a layer (e.g. the prompt in
  micro-batches): their tokens follow one another in file order.
- ``K`` comes from ``top_k`` when given, else from the entry: an ``n_expert_used`` field,
  or ``ne[0]`` of the ``ffn_moe_topk`` source (the ids tensor), or ``ids_ne[0]``, or
  ``dst_ne[1]`` (the result of MUL_MAT_ID is ``[n_out, K, n_tokens]``). When none is
  present the import stops and asks for ``top_k`` / ``--top-k``.

Output: one sequence per domain directory (``seq`` = index of the domain in sorted
name order, label ``domain`` = the directory name); tokens in file order (files sorted
by ``NNNNN``), ``pos`` = running token index within the domain (equal to ``NNNNN`` when
every file holds one token). ``token_id`` is -1 (the traces carry no vocabulary ids).
``n_experts`` = largest id + 1 unless given. Every file must record the same layers.

Files are read twice (one pass for the shape and ``n_experts``, one to write), one at a
time: memory is bounded by the largest file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from moetrace.progress import tqdm

from moetrace.errors import MoetraceError
from moetrace.io.base import MAX_EXPERTS, MAX_LAYER_ID, POS_RANGE, resolve_n_experts, write_store
from moetrace.store import TraceStore

TRACE_FILE = re.compile(r"token-(\d+)\.json")
LAYER_SUFFIX = re.compile(r"(^blk\.\d+\.)|(-\d+$)")


def import_llamacpp(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    *,
    top_k: int | None = None,
    n_experts: int | None = None,
    model: str | None = None,
    chunk_rows: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TraceStore:
    """Import ``directory/<domain>/traces/token-NNNNN.json`` files into a new store at ``out``.

    Writes N tokens (all tokens of all files): ``tokens/seq`` int64 [N] (domain index),
    ``tokens/pos`` int32 [N] (token index within the domain), ``tokens/domain`` uint16 [N],
    ``routing/experts`` [N, L, K] with L = the recorded ``layer_id`` values. See the module
    docstring for the rules. Returns the store opened read-only; raises MoetraceError
    naming the file (and layer / JSON line) on bad input, leaving nothing at ``out``.
    """
    directory = Path(directory)
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) < 1):
        raise MoetraceError(f"top_k: expected a positive integer, got {top_k!r}")
    domains = _domains(directory)
    files = [(name, _trace_files(directory / name / "traces")) for name in domains]

    # Pass 1: shape (layers, K) and the largest expert id; validates every file.
    layer_ids: list[int] | None = None
    K = top_k
    max_expert = -1
    shape_file = None
    for _, paths in files:
        for path in tqdm(paths, desc="scan", unit="file", disable=not progress):
            layers, experts, k = _parse(path, K)
            if layer_ids is None:
                layer_ids, K, shape_file = layers, k, path
            elif layers != layer_ids:
                raise MoetraceError(f"{path}: records layers {layers}, expected {layer_ids} like {shape_file}")
            max_expert = max(max_expert, int(experts.max()))
    n_experts = resolve_n_experts(max_expert, n_experts, str(directory), K)

    def batches():  # pass 2: one file at a time
        for seq, (domain, paths) in enumerate(files):
            pos = 0
            for path in tqdm(paths, desc=domain, unit="file", disable=not progress):
                _, experts, _ = _parse(path, K)
                n = len(experts)
                if pos + n - 1 > POS_RANGE[1]:
                    raise MoetraceError(f"{path}: token {pos + n - 1} of domain {domain}: expected at most "
                                        f"{POS_RANGE[1] + 1} tokens per domain (tokens/pos is int32)")
                yield {"seq": np.full(n, seq, dtype=np.int64), "pos": np.arange(pos, pos + n, dtype=np.int32),
                       "domain": np.full(n, domain), "experts": experts}
                pos += n

    return write_store(out, batches(), overwrite=overwrite, inputs=(directory,), n_layers=len(layer_ids),
                       n_experts=n_experts, top_k=K, layer_ids=layer_ids, labels=["domain"], model=model,
                       chunk_rows=chunk_rows)


def _domains(directory: Path) -> list[str]:
    if not directory.is_dir():
        raise MoetraceError(f"{directory}: no such directory (expected DIR/<domain>/traces/token-NNNNN.json)")
    names = sorted(p.name for p in directory.iterdir() if (p / "traces").is_dir())
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise MoetraceError(f"{directory / name!r}: the domain directory's name is not UTF-8 "
                                f"(it becomes the 'domain' label; rename it)") from None
    if not names:
        raise MoetraceError(f"{directory}: no <domain>/traces/ subdirectories "
                            f"(expected DIR/<domain>/traces/token-NNNNN.json)")
    return names


def _trace_files(traces: Path) -> list[Path]:
    """``token-NNNNN.json`` files of one domain, sorted by NNNNN."""
    found = []
    for path in traces.iterdir():
        match = TRACE_FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        raise MoetraceError(f"{traces}: no token-NNNNN.json files")
    found.sort()
    return [path for _, path in found]


def _parse(path: Path, top_k: int | None) -> tuple[list[int], np.ndarray, int]:
    """One trace file -> (sorted layer ids, experts int64 [n_tokens, L, K], K)."""
    try:
        with open(path, "rb") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise MoetraceError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}; "
                            f"truncated file?)") from None
    except RecursionError:
        raise MoetraceError(f"{path}: JSON nested too deeply to be a llama.cpp trace (expected an object "
                            f"with an 'entries' list of flat entries)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MoetraceError(f"{path}: unreadable ({exc})") from None
    entries = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise MoetraceError(f"{path}: expected a JSON object with an 'entries' list")
    calls: dict[int, dict[str, list[np.ndarray]]] = {}
    K = top_k
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("operation_type") != "MUL_MAT_ID" or not entry.get("expert_ids"):
            continue
        where = f"{path}: entries[{index}]"
        layer = entry.get("layer_id")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= MAX_LAYER_ID:
            raise MoetraceError(f"{where}: layer_id: expected an integer in [0, {MAX_LAYER_ID}], "
                                f"got {_short(layer)}")
        raw = entry["expert_ids"]
        try:  # true/false would become 1/0: only JSON integers are ids
            ids = np.asarray(raw) if isinstance(raw, list) and set(map(type, raw)) == {int} else np.asarray([None])
        except ValueError:
            ids = np.asarray([None])
        if ids.ndim != 1 or ids.dtype.kind not in "iu":  # big integers give object or float arrays
            raise MoetraceError(f"{where} (layer {layer}): expert_ids: expected a flat list of integers in "
                                f"[0, {MAX_EXPERTS - 1}], got {_short(entry['expert_ids'])}")
        bad = (ids < 0) | (ids >= MAX_EXPERTS)  # compared in the parsed dtype: uint64 does not wrap
        if bad.any():
            i = int(np.argmax(bad))
            raise MoetraceError(f"{where} (layer {layer}): expert_ids[{i}]: expected an expert id in "
                                f"[0, {MAX_EXPERTS - 1}], got {ids[i].item()}")
        ids = ids.astype(np.int64)
        k = _entry_top_k(entry)
        if K is None:
            K = k
        if K is None:
            raise MoetraceError(
                f"{where} (layer {layer}): cannot infer top-k (no 'n_expert_used', 'ids_ne' or 'dst_ne' field, "
                f"no 'ffn_moe_topk' source with 'ne'); pass top_k / --top-k")
        if k is not None and k != K:
            raise MoetraceError(f"{where} (layer {layer}): top-k {k} from the entry disagrees with top-k {K}")
        if len(ids) % K:
            raise MoetraceError(f"{where} (layer {layer}): expert_ids: expected a multiple of top-k={K} ids "
                                f"(K per token), got {len(ids)}")
        component = LAYER_SUFFIX.sub("", str(entry.get("dst_name", "")))
        calls.setdefault(layer, {}).setdefault(component, []).append(ids.reshape(-1, K))
    if not calls:
        raise MoetraceError(f"{path}: no MUL_MAT_ID entries with expert_ids (expected MoE routing entries)")
    layers = sorted(calls)
    per_layer = []
    for layer in layers:
        components = calls[layer]
        names = sorted(components)
        reference = components[names[0]]
        for name in names[1:]:
            other = components[name]
            if len(other) != len(reference) or any(
                    a.shape != b.shape or (a != b).any() for a, b in zip(reference, other)):
                raise MoetraceError(
                    f"{path}: layer {layer}: expert_ids of {name or 'unnamed'} disagree with those of "
                    f"{names[0] or 'unnamed'} (gate/up/down entries of one layer must repeat the same ids)")
        per_layer.append(np.concatenate(reference))
    counts = {len(ids) for ids in per_layer}
    if len(counts) > 1:
        detail = ", ".join(f"layer {lay}: {len(ids)}" for lay, ids in zip(layers, per_layer))
        raise MoetraceError(f"{path}: layers route different numbers of tokens ({detail})")
    return layers, np.stack(per_layer, axis=1), K


def _short(value) -> str:
    """``repr(value)`` cut to 60 characters, for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _entry_top_k(entry: dict) -> int | None:
    """K stated by an entry, or None when it states none."""
    k = entry.get("n_expert_used")
    if _count(k):
        return k
    sources = entry.get("sources")
    for source in sources if isinstance(sources, list) else []:
        if isinstance(source, dict) and "ffn_moe_topk" in str(source.get("name", "")):
            ne = source.get("ne")
            if isinstance(ne, list) and ne and _count(ne[0]):
                return ne[0]
    ne = entry.get("ids_ne")
    if isinstance(ne, list) and ne and _count(ne[0]):
        return ne[0]
    ne = entry.get("dst_ne")  # MUL_MAT_ID's result is [n_out, K, n_tokens, 1]
    if isinstance(ne, list) and len(ne) >= 3 and _count(ne[1]):
        return ne[1]
    return None


def _count(value) -> bool:
    """True for a positive JSON integer (not a bool) that could be a top-k."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_EXPERTS
