"""``--format megatron``: Megatron-LM router traces written with ``--moe-routing-trace-path``.

Megatron-LM writes ``router_trace_rank<R>.jsonl`` files into that directory (the format
its ``analyze_router_trace.py`` reads, the same for training and inference): one JSON
object per line and MoE layer, ``{"rank": R, "step": S, "layer": l, "top_indices":
[[id, ...] per token]}`` (``top_indices`` rank 0 first).

SRC is that directory (or one such file). One sequence per (rank, step), in file-name
order then order of first appearance; its tokens are the rows of ``top_indices`` (every
layer of a step must list the same number of tokens and every step the same layers).
The traces do not say which tokens were generated: all are marked prompt (``generated``
False); token ids are -1. The request id (for a labels file) is ``"<rank>:<step>"``;
``--label-fields`` may name ``rank``, ``step`` or any other scalar field of the lines.
The store's layer ids are the recorded ``layer`` numbers.
A file is held in memory while its steps are assembled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from engine.errors import MoetraceError
from engine.io.base import MAX_LAYER_ID
from engine.io.routed import Request, int_array, iter_json_lines

HELP = "SRC is a --moe-routing-trace-path directory of router_trace_rank*.jsonl files (or one file)"


def read(src: Path, top_k: int | None = None) -> Iterator[Request]:
    if src.is_file():
        files = [src]
    else:
        files = sorted(src.glob("router_trace_rank*.jsonl"))
        if not files:
            raise MoetraceError(f"{src}: no router_trace_rank*.jsonl files (written by --moe-routing-trace-path)")
    for path in files:
        steps: dict[tuple, dict] = {}
        for line_no, obj in iter_json_lines(path):
            where = f"{path}: line {line_no}"
            if not isinstance(obj, dict):
                raise MoetraceError(f"{where}: expected a JSON object with rank, step, layer, top_indices")
            for name in ("rank", "step", "layer"):
                value = obj.get(name)
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LAYER_ID:
                    raise MoetraceError(f"{where}: {name}: expected a non-negative integer, got {value!r}")
            top = int_array(obj.get("top_indices"), where, "top_indices", 2)
            key = (obj["rank"], obj["step"])
            entry = steps.setdefault(key, {"layers": {}, "where": where,
                                           "fields": {k: v for k, v in obj.items()
                                                      if k not in ("layer", "top_indices")
                                                      and not isinstance(v, (list, dict))}})
            if obj["layer"] in entry["layers"]:
                raise MoetraceError(f"{where}: rank {key[0]}, step {key[1]}, layer {obj['layer']} appears twice")
            first = next(iter(entry["layers"].values()), None)
            if first is not None and top.shape != first.shape:
                raise MoetraceError(f"{where}: layer {obj['layer']}: top_indices shape {list(top.shape)}, "
                                    f"expected {list(first.shape)} like the step's other layers")
            entry["layers"][obj["layer"]] = top
        for (rank, step), entry in steps.items():
            layers = sorted(entry["layers"])
            experts = np.stack([entry["layers"][lay] for lay in layers], axis=1)
            yield Request(where=f"{entry['where']} (rank {rank}, step {step}, layers {layers})", key=f"{rank}:{step}",
                          experts=experts, fields=entry["fields"], layer_ids=layers)
