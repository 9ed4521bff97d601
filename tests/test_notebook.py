"""The README's "From a notebook" section, run as a real notebook (nbclient + ipykernel).

One cell per paragraph of its code block. Checked: every cell runs; every cell that ends in a
``mt.figures`` call shows an ``image/png`` (no ``%matplotlib`` magic anywhere); the capture cell
shows a progress bar (a Jupyter widget, or tqdm's text bar when ipywidgets is missing); the
ablation prints a loss that rises.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

README = Path(__file__).resolve().parents[1] / "README.md"
WIDGET = "application/vnd.jupyter.widget-view+json"


def notebook_cells() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## From a notebook"):]
    section = section[:section.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return [cell.strip() for cell in code.split("\n\n") if cell.strip()]


def test_the_readme_notebook_runs_and_shows_figures_and_progress(tmp_path, monkeypatch):
    cells = notebook_cells()
    assert not any("%matplotlib" in c for c in cells)
    monkeypatch.delenv("MOETRACE_PROGRESS", raising=False)  # the notebook, not the environment, turns bars on
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    figure_cells = 0
    for cell in nb.cells:
        outputs = cell.get("outputs", [])
        assert not [o for o in outputs if o.get("output_type") == "error"], cell.source
        if cell.source.splitlines()[-1].startswith("mt.figures."):
            figure_cells += 1
            assert any("image/png" in o.get("data", {}) for o in outputs), cell.source
    assert figure_cells == 2
    capture_cell = next(c for c in nb.cells if "mt.capture_texts(" in c.source)
    outputs = capture_cell["outputs"]
    widget = any(WIDGET in o.get("data", {}) for o in outputs)
    text_bar = any(o.get("name") == "stderr" and re.search(r"capture: +\d+%", o.get("text", "")) for o in outputs)
    assert widget or text_bar, outputs
    printed = "".join(o.get("text", "") for o in nb.cells[-1]["outputs"] if o.get("name") == "stdout")
    base, ablated = (float(v) for v in re.fullmatch(r"loss (\S+) -> (\S+)\n", printed).groups())
    assert ablated > base
    assert (tmp_path / "nb.zarr").is_dir()
