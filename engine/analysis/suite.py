"""Every model-based analysis at once into one directory (what ``moetrace demo`` adds to its run).

:func:`write_outputs` is the one writer of an analysis' files (CSV table, Zarr dataset, JSON,
PNG + PDF figure) that the commands and :func:`run_suite` share.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_outputs(out: Path, name: str, fig=None, table=None, dataset=None, data: Any = None) -> list[Path]:
    """Write ``out/name.{csv,zarr,json,png,pdf}`` for the pieces given; returns the paths written."""
    from moetrace.analysis._common import save_result

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
    (:func:`moetrace.analysis.token_batches`) into a new store at ``path``, one label ``group``."""
    import shutil

    import torch

    from moetrace.analysis._common import model_inputs
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


def run_suite(model, input_ids: Sequence[Sequence[int]], groups: Sequence[str], out: str | Path, *,
              num_tokens: int = 2000, layers: Sequence[int] | None = None, batch_size: int = 16, pad_id: int = 0,
              decode: Callable[[Sequence[int]], str] | None = None, store=None, method: str = "auto") -> list[Path]:
    """Router decisiveness, router statistics, expert similarity, a 2-D map (first layer; ``method`` as in
    :func:`moetrace.analysis.reduce_2d`), a profile and a steering example of the busiest expert of the
    first layer, into ``out``; returns the files.

    Decisiveness comes from ``store``'s routing/probs when it has them, else from a short capture
    (``num_tokens`` tokens) with ``probs=True`` into ``out/probs.zarr``.
    """
    from moetrace import figures
    from moetrace.analysis import (decisiveness, expert_profile, expert_similarity, reduce_2d, router_stats,
                                   steer_prompt, weight_similarity)
    from moetrace.analysis.decisiveness import table as decisiveness_table
    from moetrace.analysis.router_stats import table as router_stats_table
    from moetrace.analysis._common import experts_modules, token_batches
    from moetrace.store import TraceStore

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def batches():
        return token_batches(input_ids, batch_size=batch_size, num_tokens=num_tokens, pad_id=pad_id, groups=groups)

    layer_ids = sorted(experts_modules(model, layers))
    written: list[Path] = []
    if store is None or not TraceStore.open(store).has_probs:
        store = capture_probs(model, batches(), out / "probs.zarr")
    st = TraceStore.open(store)
    ds = decisiveness(st, layers=layer_ids, by=st.label_names)
    written += write_outputs(out, "decisiveness", figures.decisiveness(ds), decisiveness_table(ds), dataset=ds)
    ds = router_stats(model, batches(), layers=layer_ids)
    written += write_outputs(out, "router_stats", figures.router_stats(ds), router_stats_table(ds), dataset=ds)
    sim = expert_similarity(model, batches(), layers=layer_ids).merge(weight_similarity(model, layer_ids))
    written += write_outputs(out, "similarity", None, sim.to_dataframe().reset_index(), dataset=sim)
    for layer in layer_ids:
        written += write_outputs(out, f"similarity_layer{layer}", figures.similarity(sim, layer))
    first = layer_ids[0]
    points = reduce_2d(model, batches(), first, method=method)
    written += write_outputs(out, f"dim_reduc_layer{first}", figures.embedding(points), points,
                             data=dict(points.attrs))
    ex = np.zeros(st.n_experts, dtype=np.int64)
    pos = st.layer_ids.tolist().index(first)
    for chunk in st.iter_chunks(["experts"]):
        ex += np.bincount(chunk["experts"][:, pos, :].ravel().astype(np.int64), minlength=st.n_experts)
    busiest = int(np.argmax(ex))
    prof = expert_profile(st, first, busiest, decode=decode)
    written += write_outputs(out, f"profile_layer{first}_expert{busiest}", data=prof)
    prompt = list(input_ids[0])[:24]
    res = steer_prompt(model, prompt, [first], busiest, scale=0.0, target_idx=-1, max_new_tokens=12, decode=decode)
    written += write_outputs(out, f"steer_layers{first}_expert{busiest}", figures.steering(res), data=res)
    return written
