"""Progress bars draw on a terminal only; logs (CI, `2> log`) get the result lines alone."""

import io
import subprocess
import sys

from moetrace import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.delenv("MOETRACE_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress.bars_enabled()
    assert progress.tqdm(range(3)).disable


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
    monkeypatch.setattr(sys, "stderr", _Tty())
    monkeypatch.setenv("MOETRACE_PROGRESS", "0")
    assert not progress.bars_enabled()


def test_a_command_with_stderr_to_a_file_writes_no_carriage_returns(tmp_path):
    """A real command (synthetic trace, which shows a bar) with stderr redirected: no bar in the log."""
    code = ("from moetrace.synthetic import TraceSpec, write_store\n"
            f"write_store({str(tmp_path / 't.zarr')!r}, TraceSpec(n_tokens=3000, n_layers=2, n_experts=8, top_k=2))\n")
    log = tmp_path / "log"
    with open(log, "w") as err:
        subprocess.run([sys.executable, "-c", code], check=True, stderr=err, env={**__import__("os").environ,
                                                                                     "MOETRACE_PROGRESS": ""})
    assert "\r" not in log.read_text()
    assert "synthetic trace" not in log.read_text()
