"""``--format megatron``: Megatron-LM router traces written with ``--moe-routing-trace-path``.

Read as Megatron-Core's ``RouterTracer`` writes them (``megatron/core/transformer/moe/router_trace.py``,
megatron-core 0.19.2 on PyPI, the same record format as NVIDIA/Megatron-LM main at commit
059f0f5c): one ``router_trace_rank<R>.jsonl`` file per rank, one JSON object per line and
router call::

    {"step": S, "stage": "pre_dispatch", "block": "decoder" | "mtp", "layer": l, "rank": R,
     "num_tokens": T, "topk": K, "top_indices": [[id, ...] per token], "mtp_idx": i (MTP only),
     "logit_offset": o, "logit_bytes": b, "logit_shape": [T, E] (with --moe-routing-trace-capture-logits)}

SRC is that directory (or one such file).

**Blocks.** Only one block is imported: ``block="decoder"`` (default; records without a
``block`` field are decoder records) or ``block="mtp:<i>"`` (the multi-token-prediction head
``i``, whose tokens differ from the decoder's). Records of other blocks are skipped with a
warning naming how many there were. The store's layer ids are the block's recorded ``layer``
numbers.

**Sequences.** Records are grouped by (rank, step); within a step, the n-th record of one layer
belongs to micro-batch n (training calls every router once per micro-batch before the step
advances; inference steps have one). A micro-batch's rows are its tokens in Megatron's
sequence-major layout ``[seq_length, micro_batch_size]`` flattened, so with
``micro_batch_size=B`` row r is position ``r // B`` of sequence ``r % B``: pass the run's
``--micro-batch-size`` (default 1). One moetrace sequence per (rank, step, micro-batch,
sequence); its request id (for a labels file) is ``"<rank>:<step>:<micro_batch>:<sequence>"``
and ``--label-fields`` may name ``rank``, ``step``, ``micro_batch``, ``sequence`` or any other
scalar field of the records. Tokens are marked prompt (``generated`` False); token ids are -1.
Activation recomputation runs a router twice per micro-batch and cannot be told apart from a
second micro-batch: trace without it.

**Rank order.** ``TopKRouter`` returns a boolean routing map; the tracer turns it into
``top_indices`` with ``nonzero()``, which lists each token's experts in *expert-id* order, not
rank order. The inference router and ``record_indices`` hand over the indices of
``topk_routing_with_score_function``, whose ``torch.topk`` runs with ``sorted=False`` when no
gradient is recorded ("Sorting top-k turned off during inference", ``moe_utils.py``): an order
the kernel chooses. So by default (``order="scores"``) the order as written is never taken for
rank order:

- a record with router logits (the ``logits_rank<R>.bin`` sidecar, bfloat16 ``[T, E]``,
  ``--moe-routing-trace-capture-logits``) has each token's K experts ordered by selection score,
  largest first: the logit (softmax and sigmoid are monotone), or, when the run dumped its router
  state (``router_state_rank<R>.pt``, ``--moe-routing-trace-dump-weights``) and the router has an
  expert bias that acts (sigmoid, sqrtsoftplus), ``score_function(logit) + bias`` in float32 as
  ``TopKRouter`` selects: the order :mod:`moetrace.capture` records. Megatron-LM main keys that dump
  by layer number alone, which MTP layers share with the decoder's; it is then read for decoder
  records only. Where the bfloat16 rounding of the logits leaves two of a token's experts
  unordered (equal, or scores within the rounding), the token is ranked by the rounded scores
  (equal ones by id) and the import warns how many such tokens there were;
- without logits (and K >= 2) the store records its rank order as unknown
  (:attr:`moetrace.store.TraceStore.rank_order`), and statistics that need the top-1 refuse it.

``order="as-written"`` takes the file's order as rank order (for a writer known to sort).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.io.base import MAX_LAYER_ID
from moetrace.io.routed import Request, int_array
from moetrace.jsonl import iter_json_lines

HELP = "SRC is a --moe-routing-trace-path directory of router_trace_rank*.jsonl files (or one file)"
#: Options of this format: name -> (type, help); ``moetrace import-routed`` adds one flag each.
OPTIONS = {
    "block": (str, "megatron: the block to import, decoder (default) or mtp:<i> (multi-token-prediction head i)"),
    "micro_batch_size": (int, "megatron: the run's --micro-batch-size (default 1): a micro-batch's rows are its "
                              "sequences interleaved position by position"),
    "order": (str, "megatron: scores (default: rank by the router logits when traced, else rank order unknown) or "
                   "as-written (the file's order is rank order)"),
}
ORDERS = ("scores", "as-written")
_BLOCK = re.compile(r"decoder|mtp:(\d+)")


def read(src: Path, top_k: int | None = None, *, block: str = "decoder", micro_batch_size: int = 1,
         order: str = "scores") -> Iterator[Request]:
    """One :class:`Request` per (rank, step, micro-batch, sequence) of ``block``; see the module docstring."""
    if order not in ORDERS:
        raise MoetraceError(f"--order: expected one of {', '.join(ORDERS)}, got {order!r}")
    m = _BLOCK.fullmatch(block or "")
    if not m:
        raise MoetraceError(f"--block: expected decoder or mtp:<i> (e.g. mtp:0), got {block!r}")
    wanted = ("decoder", None) if m.group(1) is None else ("mtp", int(m.group(1)))
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise MoetraceError(f"--micro-batch-size: expected a positive integer, got {micro_batch_size!r}")
    if src.is_file():
        files = [src]
    else:
        files = sorted(src.glob("router_trace_rank*.jsonl"))
        if not files:
            raise MoetraceError(f"{src}: no router_trace_rank*.jsonl files (written by --moe-routing-trace-path)")
    skipped: dict[tuple, int] = {}
    found = False
    for path in files:
        for req in _read_file(path, wanted, micro_batch_size, skipped, top_k, order == "scores"):
            found = True
            yield req
    if skipped:
        other = ", ".join(f"{b}{'' if i is None else f':{i}'} ({n})" for (b, i), n in sorted(
            skipped.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1])))
        if not found:
            raise MoetraceError(f"{src}: no records of block {block}; the trace has {other} (choose one with --block)")
        warnings.warn(f"{src}: imported block {block}; skipped the records of {other} (import them with --block)",
                      stacklevel=2)


def _read_file(path: Path, wanted: tuple, micro_batch_size: int, skipped: dict, top_k,
               by_scores: bool) -> Iterator[Request]:
    steps: dict[tuple, dict] = {}  # (rank, step) -> {"batches": [{layer: rows}], "where", "fields"}
    states: dict[int, dict] = {}  # rank -> its router state dump (layer -> bias, score function), or {}
    for line_no, obj in iter_json_lines(path):
        where = f"{path}: line {line_no}"
        if not isinstance(obj, dict):
            raise MoetraceError(f"{where}: expected a JSON object with rank, step, layer, top_indices")
        for name in ("rank", "step", "layer"):
            value = obj.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LAYER_ID:
                raise MoetraceError(f"{where}: {name}: expected a non-negative integer, got {value!r}")
        key = _block_of(obj, where)
        if key != wanted:
            skipped[key] = skipped.get(key, 0) + 1
            continue
        top = int_array(obj.get("top_indices"), where, "top_indices", 2)
        if top_k is not None and top.shape[1] != top_k:
            raise MoetraceError(f"{where}: top_k is {top.shape[1]}, expected {top_k} (--top-k)")
        ranked, unsettled = top, 0
        if by_scores:
            if obj["rank"] not in states:
                states[obj["rank"]] = _router_state(path.parent / f"router_state_rank{obj['rank']}.pt")
            bias = states[obj["rank"]].get((*key, obj["layer"]))
            ranked, unsettled = _rank_by_logits(path.parent, obj, top, where, bias)
        entry = steps.setdefault((obj["rank"], obj["step"]), {
            "batches": [], "where": where,
            "fields": {k: v for k, v in obj.items() if k not in ("layer", "top_indices", "num_tokens")
                       and not k.startswith(("logit_", "hs_")) and not isinstance(v, (list, dict))}})
        batch = next((b for b in entry["batches"] if obj["layer"] not in b["layers"]), None)
        if batch is None:
            batch = {"layers": {}, "ranked": True, "unsettled": 0}
            entry["batches"].append(batch)
        first = next(iter(batch["layers"].values()), None)
        if first is not None and top.shape != first.shape:
            raise MoetraceError(f"{where}: layer {obj['layer']}: top_indices shape {list(top.shape)}, expected "
                                f"{list(first.shape)} like the other layers of its step and micro-batch")
        batch["layers"][obj["layer"]] = ranked if ranked is not None else top
        batch["ranked"] &= ranked is not None
        batch["unsettled"] += unsettled
    B = micro_batch_size
    for (rank, step), entry in steps.items():
        all_layers = sorted(entry["batches"][0]["layers"])
        for mb, batch in enumerate(entry["batches"]):
            layers = sorted(batch["layers"])
            if layers != all_layers:
                raise MoetraceError(
                    f"{entry['where']}: rank {rank}, step {step}: micro-batch {mb} has layers {layers}, micro-batch 0 "
                    f"has {all_layers}: every micro-batch calls each router once (a record repeated, or a "
                    "recomputed forward?)")
            experts = np.stack([batch["layers"][lay] for lay in layers], axis=1)  # [rows, L, K]
            where = f"{entry['where']} (rank {rank}, step {step}, micro-batch {mb}, layers {layers})"
            if len(experts) % B:
                raise MoetraceError(f"{where}: {len(experts)} rows, not a multiple of --micro-batch-size {B}")
            for s in range(B):
                fields = {**entry["fields"], "micro_batch": mb, "sequence": s}
                yield Request(where=f"{where}, sequence {s}" if B > 1 else where, key=f"{rank}:{step}:{mb}:{s}",
                              experts=experts[s::B], fields=fields, layer_ids=layers,
                              rank_order="ranked" if batch["ranked"] or experts.shape[2] == 1 else "unknown",
                              unsettled=batch["unsettled"] if s == 0 else 0)


def _block_of(obj: dict, where: str) -> tuple[str, int | None]:
    block = obj.get("block", "decoder")
    if block == "decoder":
        return "decoder", None
    idx = obj.get("mtp_idx")
    if block != "mtp" or isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
        raise MoetraceError(f"{where}: expected block 'decoder', or 'mtp' with a non-negative mtp_idx, got block "
                            f"{block!r}, mtp_idx {idx!r}")
    return "mtp", idx


def _router_state(path: Path) -> dict[tuple, tuple[str, np.ndarray]]:
    """(block, mtp index, layer) -> (score function, expert bias [E]) of the routers with a bias that
    acts in a router state dump (``RouterTracer.flush``: ``{key: {"weight", "expert_bias",
    "score_function", "topk"}}``, key ``(block, mtp_idx, layer)`` in megatron-core 0.19, the bare
    layer number on Megatron-LM main, read as a decoder layer); {} without a dump."""
    if not path.is_file():
        return {}
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a damaged file
        raise MoetraceError(f"{path}: not a router state dump torch can load ({type(exc).__name__})") from None
    out = {}
    for layer, entry in (state.items() if isinstance(state, dict) else []):
        bias = entry.get("expert_bias") if isinstance(entry, dict) else None
        function = entry.get("score_function") if isinstance(entry, dict) else None
        if bias is not None and function in ("sigmoid", "sqrtsoftplus"):  # softmax routing ignores the bias
            key = tuple(layer) if isinstance(layer, (tuple, list)) else ("decoder", None, layer)
            out[key] = (function, bias.detach().to(torch.float32).numpy())
    return out


def _rank_by_logits(directory: Path, obj: dict, top: np.ndarray, where: str,
                    bias: tuple[str, np.ndarray] | None) -> tuple[np.ndarray | None, int]:
    """(``top`` with each row ordered by selection score, largest first; the number of rows whose
    order the bfloat16 logits do not settle), or (None, 0) when the record has no logits. ``bias``:
    (score function, expert bias) of the layer, or None (the score is then the logit)."""
    if "logit_offset" not in obj:
        return None, 0
    offset, size, shape = obj.get("logit_offset"), obj.get("logit_bytes"), obj.get("logit_shape")
    T, K = top.shape
    ok = (all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, size))
          and isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) for v in shape))
    if not ok or shape[0] != T or shape[1] < 1 or size != 2 * T * shape[1]:
        raise MoetraceError(f"{where}: logit_offset {offset!r}, logit_bytes {size!r}, logit_shape {shape!r}: "
                            f"expected bfloat16 logits [num_tokens={T}, n_experts]")
    E = shape[1]
    sidecar = directory / f"logits_rank{obj['rank']}.bin"
    try:
        with open(sidecar, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(size)
    except OSError as exc:
        raise MoetraceError(f"{where}: its logits are in {sidecar}, which is unreadable ({exc.strerror})") from None
    if len(raw) != size:
        raise MoetraceError(f"{where}: {sidecar} holds {len(raw)} of the record's {size} logit bytes at offset "
                            f"{offset} (truncated file?)")
    if T == 0:
        return top, 0
    if top.min() < 0 or top.max() >= E:
        raise MoetraceError(f"{where}: an expert id outside [0, {E - 1}] (the logits cover {E} experts)")
    raw16 = np.frombuffer(raw, dtype="<u2").reshape(T, E)
    rows = np.take_along_axis(raw16, top.astype(np.int64), axis=1)  # the chosen experts' bfloat16 logits
    logit, lo, hi = _bfloat16_intervals(rows)
    if np.isnan(logit).any():
        raise MoetraceError(f"{where}: NaN among the logits of the chosen experts")
    score = _score_function(bias, E, where)
    center, lo, hi = score(logit, top), score(lo, top), score(hi, top)
    order = np.lexsort((top, -center), axis=1) if K > 1 else np.zeros((T, 1), np.int64)
    ordered = np.take_along_axis(top, order, axis=1)
    lo, hi = np.take_along_axis(lo, order, axis=1), np.take_along_axis(hi, order, axis=1)
    # ranks k and k+1 are settled only when every logit that rounds to k's bfloat16 value scores above
    # every logit that rounds to k+1's: strictly, for the logits themselves (intervals of neighbouring
    # bfloat16 values touch), and with a margin for float32 scores, which tie where the router's would
    # (sigmoid saturates at 1.0; then torch.topk, not the score, chose the order)
    overlap = (lo[:, :-1] < hi[:, 1:]) if bias is None else (lo[:, :-1] <= hi[:, 1:])
    unsettled = int(overlap.any(axis=1).sum()) if K > 1 else 0
    return ordered, unsettled


def _bfloat16_intervals(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (value, lowest, highest) of the reals that round to each bfloat16 ``bits`` (uint16)."""
    value = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    mag = np.abs(value)
    up = np.spacing(mag.astype(np.float32)).astype(np.float64) * 65536  # the gap to the next larger magnitude
    power_of_two = ((bits & 0x7F) == 0) & (mag > 0)  # the gap below is half as wide
    down = np.where(power_of_two, up / 2, up)
    lo = np.where(value >= 0, value - down / 2, value - up / 2)
    hi = np.where(value >= 0, value + up / 2, value + down / 2)
    return value, lo, hi


def _score_function(bias: tuple[str, np.ndarray] | None, E: int, where: str):
    """The selection score of logits at expert ids, ``(logits [T, K], ids [T, K]) -> [T, K]``: the logit
    itself without a bias (only the order counts), else score_function(logit) + bias[id] in float32, as
    ``topk_routing_with_score_function`` computes it."""
    if bias is None:
        return lambda logits, ids: logits
    function, values = bias
    if values.shape != (E,):
        raise MoetraceError(f"{where}: the router state's expert bias has shape {list(values.shape)}, the logits "
                            f"cover {E} experts")
    values = values.astype(np.float32)
    one = np.float32(1)

    def score(logits, ids):
        x = logits.astype(np.float32)
        with np.errstate(over="ignore"):
            s = one / (one + np.exp(-x)) if function == "sigmoid" else np.sqrt(np.logaddexp(np.float32(0), x))
        return s + values[ids]
    return score
