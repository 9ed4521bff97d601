"""``bench/gpu_check.py`` (``make gpu-check``) proven on the CPU: its dry run executes every step
with tiny shapes and writes one table in which no step failed or was skipped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.md"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    steps = {r[0].strip("| ") for r in rows[1:]}
    assert steps == {"kernel tests", "routing", "model", "compile"}
    verdicts = [r[4] for r in rows[1:]]
    assert "FAILED" not in verdicts and "not run" not in verdicts, out.read_text()
    assert any("logits equal eager" in r[1] and r[4] == "meets" for r in rows[1:])
