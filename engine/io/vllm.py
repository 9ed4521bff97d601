"""``--format vllm``: vLLM OpenAI-compatible server responses with routed experts, one JSON per line.

vLLM started with ``--enable-return-routed-experts`` adds to a ``/v1/completions`` or
``/v1/chat/completions`` response (``vllm/entrypoints/openai/*/protocol.py``; the engine's
``CompletionOutput.routed_experts`` is an int array ``[seq_len, layer_num, topk]``, filled by
``vllm/model_executor/layers/fused_moe/routed_experts_capturer.py``, vLLM 0.20-0.21, a port of
SGLang's capturer at commit bed301a5):

- ``prompt_routed_experts``: ``[prompt tokens][layers][top_k]`` (response level, may be null);
- ``choices[i].routed_experts``: ``[generated tokens][layers][top_k]`` for that choice;
- optionally ``prompt_token_ids`` (response level, or per choice in ``/v1/completions``
  responses, which carry it in ``choices[i].prompt_token_ids``) and ``choices[i].token_ids``.

SRC is a ``.jsonl`` file of response bodies (or a directory of ``.jsonl``/``.json`` files,
sorted by name). Each choice is one sequence: the prompt's rows (``generated`` False)
followed by the choice's rows (``generated`` True). vLLM records no routing for the last
generated token (it is never fed back), so a choice may have one row fewer than
``token_ids``: generated row ``j`` gets ``token_ids[j]``. Token ids are -1 where absent.
The request id (for a labels file) is the response's ``id``; ``--label-fields`` reads
top-level fields of the response (e.g. ``model``) and ``choice`` (the choice index).

vLLM fills its host-side routing buffer with -1 before the model writes it, so a row it never
filled (every id -1) is padding: such rows are dropped (the import says how many), the others
keep their positions. A row with only some ids -1 is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.io.routed import Request, int_array, source_files
from moetrace.jsonl import iter_json_lines

#: vLLM's fill value for routing rows it has not written.
FILL = -1

HELP = "SRC is a JSONL file (or directory) of vLLM server responses with prompt_routed_experts / routed_experts"


def read(src: Path, top_k: int | None = None) -> Iterator[Request]:
    for path in source_files(src, (".jsonl", ".json")):
        for line_no, obj in iter_json_lines(path):
            where = f"{path}: line {line_no}"
            if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
                raise MoetraceError(f"{where}: expected a vLLM response object with a 'choices' list")
            prompt = obj.get("prompt_routed_experts")
            prompt = None if prompt is None else int_array(prompt, where, "prompt_routed_experts", 3)
            top_prompt_ids = _ids(obj.get("prompt_token_ids"), where, "prompt_token_ids")
            fields = {k: v for k, v in obj.items() if not isinstance(v, (list, dict))}
            found = False
            for index, choice in enumerate(obj["choices"]):
                at = f"{where}, choices[{index}]"
                if not isinstance(choice, dict):
                    raise MoetraceError(f"{at}: expected an object, got {type(choice).__name__}")
                prompt_ids = top_prompt_ids
                if prompt_ids is None:  # /v1/completions: per choice
                    prompt_ids = _ids(choice.get("prompt_token_ids"), at, "prompt_token_ids")
                if prompt is not None and prompt_ids is not None and len(prompt_ids) != len(prompt):
                    raise MoetraceError(f"{at}: prompt_token_ids has {len(prompt_ids)} tokens, "
                                        f"prompt_routed_experts {len(prompt)}")
                gen = choice.get("routed_experts")
                if gen is None and prompt is None:
                    continue
                found = True
                gen = np.zeros((0, *prompt.shape[1:]), np.int64) if gen is None else int_array(
                    gen, at, "routed_experts", 3)
                if prompt is not None and len(gen) and prompt.shape[1:] != gen.shape[1:]:
                    raise MoetraceError(f"{at}: routed_experts has [layers, top_k] = {list(gen.shape[1:])}, "
                                        f"prompt_routed_experts {list(prompt.shape[1:])}")
                out_ids = _ids(choice.get("token_ids"), at, "token_ids")
                if out_ids is not None and len(out_ids) not in (len(gen), len(gen) + 1):
                    raise MoetraceError(f"{at}: token_ids has {len(out_ids)} tokens, expected {len(gen)} or "
                                        f"{len(gen) + 1} (one per routed_experts row, + the last sampled token)")
                parts = [p for p in (prompt, gen) if p is not None and len(p)]
                experts = np.concatenate(parts) if parts else gen
                P = 0 if prompt is None else len(prompt)
                token_id = None
                if prompt_ids is not None or out_ids is not None:
                    token_id = np.full(len(experts), -1, np.int64)
                    if prompt_ids is not None:
                        token_id[:P] = prompt_ids
                    if out_ids is not None:
                        token_id[P:] = out_ids[:len(gen)]
                filled = ~(experts == FILL).all(axis=(1, 2)) if experts.size else np.ones(len(experts), bool)
                pos = np.flatnonzero(filled)
                yield Request(where=at, key=str(obj.get("id", f"{path.name}:{line_no}")), experts=experts[filled],
                              generated=(np.arange(len(experts)) >= P)[filled],
                              token_id=None if token_id is None else token_id[filled],
                              fields={**fields, "choice": choice.get("index", index)},
                              pos=None if filled.all() else pos, dropped=int((~filled).sum()))
            if not found:
                raise MoetraceError(f"{where}: no prompt_routed_experts or routed_experts (start vLLM with "
                                    f"--enable-return-routed-experts on an MoE model)")


def _ids(value, where: str, what: str) -> np.ndarray | None:
    return None if value is None else int_array(value, where, what, 1)
