"""``--format sglang``: SGLang ``/generate`` responses with ``return_routed_experts``, one JSON per line.

SGLang started with ``--enable-return-routed-experts`` and asked with
``"return_routed_experts": true`` puts in each response's ``meta_info`` (the buffers of
``python/sglang/srt/layers/moe/routed_experts_capturer.py``, commit bed301a5, span every decoder
layer: a dense layer stays all zeros and is dropped, :mod:`moetrace.io.routed`):

- ``routed_experts``: base64 of a little-endian int32 C-order array ``[tokens, layers, top_k]``
  covering the prompt and the generated tokens except the last one (which is never fed
  back), i.e. ``prompt_tokens + completion_tokens - 1`` rows;
- ``prompt_tokens``, ``completion_tokens`` and ``id`` (the request id).

The response's ``output_ids`` are the generated token ids. The array is flat, so
``--top-k`` is required; the number of layers follows from its size. SRC is a ``.jsonl``
file (or directory of ``.jsonl``/``.json`` files); a line may hold one response or a list
(a batched request). Rows ``< prompt_tokens`` are prompt tokens (token id -1), the rest
generated (token ids from ``output_ids``). ``--label-fields`` reads fields of
``meta_info`` and then of the response (non-container values).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Iterator

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.io.routed import Request, int_array, source_files
from moetrace.jsonl import iter_json_lines

HELP = "SRC is a JSONL file (or directory) of SGLang /generate responses with meta_info.routed_experts (base64 int32)"


def read(src: Path, top_k: int | None = None) -> Iterator[Request]:
    if top_k is None:
        raise MoetraceError("--top-k: required for --format sglang (its routed_experts arrays are flat)")
    for path in source_files(src, (".jsonl", ".json")):
        for line_no, obj in iter_json_lines(path):
            items = obj if isinstance(obj, list) else [obj]
            for i, item in enumerate(items):
                where = f"{path}: line {line_no}" + (f", item {i}" if isinstance(obj, list) else "")
                yield _request(item, where, top_k, path, line_no)


def _request(obj, where: str, K: int, path: Path, line_no: int) -> Request:
    meta = obj.get("meta_info") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        raise MoetraceError(f"{where}: expected an SGLang response object with 'meta_info'")
    encoded = meta.get("routed_experts")
    if not isinstance(encoded, str):
        raise MoetraceError(f"{where}: meta_info.routed_experts: expected a base64 string (request with "
                            f"return_routed_experts=true, server with --enable-return-routed-experts)")
    counts = {}
    for name in ("prompt_tokens", "completion_tokens"):
        value = meta.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise MoetraceError(f"{where}: meta_info.{name}: expected a non-negative integer, got {value!r}")
        counts[name] = value
    P, C = counts["prompt_tokens"], counts["completion_tokens"]
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MoetraceError(f"{where}: meta_info.routed_experts: not valid base64") from None
    if len(raw) % 4:
        raise MoetraceError(f"{where}: meta_info.routed_experts: {len(raw)} bytes, not a whole number of int32")
    flat = np.frombuffer(raw, dtype="<i4")
    T = max(P + C - 1, 0)
    if T == 0 or flat.size % (T * K):
        raise MoetraceError(f"{where}: meta_info.routed_experts: {flat.size} ids do not fill [tokens={T} "
                            f"(prompt_tokens + completion_tokens - 1), layers, top_k={K}]")
    experts = flat.reshape(T, -1, K)
    output_ids = obj.get("output_ids")
    token_id = np.full(T, -1, np.int64)
    if output_ids is not None:
        ids = int_array(output_ids, where, "output_ids", 1)
        if len(ids) != C:
            raise MoetraceError(f"{where}: output_ids has {len(ids)} tokens, meta_info.completion_tokens is {C}")
        token_id[P:] = ids[:T - P]
    fields = {k: v for k, v in obj.items() if not isinstance(v, (list, dict))}
    fields.update({k: v for k, v in meta.items() if not isinstance(v, (list, dict))})
    return Request(where=where, key=str(meta.get("id", f"{path.name}:{line_no}")), experts=experts,
                   generated=np.arange(T) >= P, token_id=token_id, fields=fields)
