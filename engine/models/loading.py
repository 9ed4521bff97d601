"""The one model loader every command and the notebook API use.

``load_model("demo")`` is the shipped demo model (no download); any other name is a local
checkpoint directory or a Hugging Face hub id, loaded with transformers' Auto classes. A failure
is one line (``MoetraceError``), never the hub client's multi-line traceback.
"""

from __future__ import annotations

from pathlib import Path

from moetrace.errors import MoetraceError

DEMO = "demo"
# the --model help of every command that loads a model
MODEL_HELP = "'demo' (the shipped demo model), a local transformers checkpoint directory, or a hub id"


def resolve(name: str | Path) -> str:
    """The checkpoint directory or hub id that ``name`` stands for (``"demo"``: the shipped demo model's directory)."""
    if str(name) == DEMO:
        from moetrace.demo.model import ensure_demo_model

        return str(ensure_demo_model(progress=False))
    return str(name)


def load_model(name: str | Path, *, tokenizer: bool = True, require_tokenizer: bool = False):
    """``(model, tokenizer)`` for ``name``: ``"demo"``, a checkpoint directory or a hub id.

    The model is a ``transformers`` ``AutoModelForCausalLM`` in eval mode. ``tokenizer=False``
    skips the tokenizer (``None`` is returned); otherwise a checkpoint without one gives ``None``
    unless ``require_tokenizer``, which makes that an error too.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moetrace.progress import transformers_bars

    path = resolve(name)
    try:
        with transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(path).eval()
    except (OSError, ValueError) as exc:
        raise MoetraceError(f"model {name}: expected 'demo', a transformers checkpoint directory or a hub id that "
                            f"loads, got an error ({_first_line(exc)})") from None
    if not tokenizer:
        return model, None
    try:
        return model, AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        if require_tokenizer:
            raise MoetraceError(f"model {name}: no tokenizer loads from it ({_first_line(exc)})") from None
        return model, None


def load_tokenizer(name: str | Path | None):
    """The tokenizer at ``name`` (``"demo"``, a directory or a hub id; e.g. :attr:`TraceStore.tokenizer`),
    or None when there is none or it does not load: callers then show token ids."""
    if not name:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(resolve(name))
    except (OSError, ValueError, MoetraceError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
