"""Every model-based analysis at once into one directory (what ``moetrace demo`` adds to its run):
each analysis' ``suite`` step (:data:`moetrace.analysis.ANALYSES`), in their order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from moetrace.analysis import ANALYSES
from moetrace.analysis._common import SuiteRun, capture_probs, experts_modules, token_batches


def run_suite(model, input_ids: Sequence[Sequence[int]], groups: Sequence[str], out: str | Path, *,
              num_tokens: int = 2000, layers: Sequence[int] | None = None, batch_size: int = 16, pad_id: int = 0,
              decode: Callable[[Sequence[int]], str] | None = None, store=None, method: str = "auto") -> list[Path]:
    """Router decisiveness, router statistics, expert similarity, a 2-D map (first layer; ``method`` as in
    :func:`moetrace.analysis.reduce_2d`), a profile and a steering example of the busiest expert of the
    first layer, into ``out``; returns the files.

    Decisiveness comes from ``store``'s routing/probs when it has them, else from a short capture
    (``num_tokens`` tokens) with ``probs=True`` into ``out/probs.zarr``.
    """
    from moetrace.store import TraceStore

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if store is None or not TraceStore.open(store).has_probs:
        batches = token_batches(input_ids, batch_size=batch_size, num_tokens=num_tokens, pad_id=pad_id, groups=groups)
        store = capture_probs(model, batches, out / "probs.zarr")
    run = SuiteRun(model=model, input_ids=input_ids, groups=groups, out=out, store=TraceStore.open(store),
                   layers=sorted(experts_modules(model, layers)), num_tokens=num_tokens, batch_size=batch_size,
                   pad_id=pad_id, decode=decode, method=method)
    written: list[Path] = []
    for analysis in ANALYSES:
        if analysis.suite is not None:
            written += analysis.suite(run)
    return written
