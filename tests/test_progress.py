"""Progress bars draw on a terminal and in a notebook; a log (CI, `2> log`) gets plain progress lines
(start, every LOG_INTERVAL seconds, end) and never a carriage return; MOETRACE_PROGRESS=0 silences both."""

import io
import subprocess
import sys

from moetrace import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_plain_lines_not_a_bar(monkeypatch):
    monkeypatch.delenv("MOETRACE_PROGRESS", raising=False)
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    assert not progress.bars_enabled()
    assert list(progress.tqdm(range(3), desc="scan", unit="file")) == [0, 1, 2]
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[progress] scan: 0/3 file after 00:00")
    assert lines[-1].startswith("[progress] scan: 3/3 file after 00:00")
    assert "\r" not in log.getvalue()
    assert progress.tqdm(range(3), disable=True).disable


def test_bars_draw_on_a_terminal_unless_disabled(monkeypatch):
    monkeypatch.delenv("MOETRACE_PROGRESS", raising=False)
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress.bars_enabled()
    assert not progress.tqdm(range(3), file=tty).disable
    assert progress.tqdm(range(3), file=tty, disable=True).disable


def test_environment_variable_overrides_the_terminal_check(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setenv("MOETRACE_PROGRESS", "1")
    assert progress.bars_enabled()
    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    monkeypatch.setenv("MOETRACE_PROGRESS", "0")
    assert not progress.bars_enabled()
    assert list(progress.tqdm(range(3))) == [0, 1, 2] and tty.getvalue() == ""  # no bar and no line either


def test_a_command_with_stderr_to_a_file_writes_no_carriage_returns(tmp_path):
    """A real command (synthetic trace, which shows a bar) with stderr redirected: lines, no bar, in the log."""
    code = ("from moetrace.synthetic import TraceSpec, write_store\n"
            f"write_store({str(tmp_path / 't.zarr')!r}, TraceSpec(n_tokens=3000, n_layers=2, n_experts=8, top_k=2))\n")
    log = tmp_path / "log"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", code], check=True, stderr=err, env={**__import__("os").environ,
                                                                                     "MOETRACE_PROGRESS": ""})
    text = log.read_text()
    assert "\r" not in text
    assert text.splitlines()[-1].startswith("[progress] synthetic trace: 3,000/3,000 tok after ")
