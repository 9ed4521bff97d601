"""Multiple-choice accuracy (MMLU format) and per-group perplexity of a causal language model.

Prompt format (``format_prompt``), k-shot examples first, separated by a blank line::

    Question: <question>
    A. <A>
    B. <B>
    C. <C>
    D. <D>
    Answer:

Two scorings (``SCORINGS``):

- ``"answer"`` (the default): each option's answer text is scored by its log-likelihood as the
  continuation of the question's context, as is standard for multiple-choice evaluation of
  language models: the score of option X is the *sum* over X's tokens of their next-token
  log-probabilities (no length normalization; the demo's options are one token each, where sum
  and mean agree). The context (:func:`answer_context`) is the question's ``context`` column when
  it has one (cloze form: the option continues that text, e.g. ``mara lives in`` + ``velm``),
  else ``"Question: <question>\nAnswer:"``. The context is tokenized with the tokenizer's
  special tokens and each option as ``" " + option`` without them; the two id lists are
  concatenated. The prediction is the option with the highest score (the first wins an exact
  tie). Inputs that several options share (every option of one token continues the same
  context) are run once. ``answer_blind=True`` scores the options with the question removed (the
  context ``"Answer:"``, or nothing but the special tokens for a cloze question): the accuracy a
  model reaches from its prior over answers alone.
- ``"letter"``: the MMLU prompt below; one forward pass over it; at its last token, compare the
  logits of the four answer-letter tokens. A letter's token is the last token of ``tokenizer.encode(" " + letter)``
(``" A"`` is one token in BPE/SentencePiece vocabularies; in the demo's word-level tokenizer it is
``A``); it must decode to the letter. The predicted letter is the argmax over those four logits
(the first letter wins an exact tie); the model's output token is the argmax over the whole
vocabulary (what greedy decoding would emit; seed 000 compares it with the answer).

Letter batches are left padded with explicit ``position_ids`` (each prompt gets positions 0..n-1 as if
it were alone) and ``logits_to_keep=1``, so padding changes nothing but float rounding and the
logits of only one position per prompt are materialized. Answer-scoring and perplexity batches are right padded
(the real tokens keep positions 0..n-1 and, under causal attention, never see the padding).
Everything runs under ``torch.no_grad()`` with the model in eval mode (its training flag is
restored afterwards); prompts are processed in a fixed order, so results are deterministic.

Routing capture: pass ``store`` (a TraceStore opened for append, or a path; default
``capture_fn`` is ``moetrace.capture.capture``). The batches then run inside
``capture_fn(model, store, labels=list(by))`` and before each forward
``cap.set_batch(seq=int64[B] question/text indices, labels={name: str[B]})`` says which
question each batch row is; the capture drops padding itself (from the ``attention_mask`` the
forward gets) and counts positions over the real tokens, so a question's rows are the same
whatever batch it was in. Multiple-choice results are then appended as per-sequence metadata.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from moetrace.progress import tqdm

from moetrace.errors import MoetraceError
from moetrace.jsonl import read_json_objects

LETTERS = ("A", "B", "C", "D")
SCORINGS = ("answer", "letter")
QUESTION_COLUMNS = ("question", "A", "B", "C", "D", "answer", "domain", "lang")
_REQUIRED_COLUMNS = ("question", "A", "B", "C", "D", "answer")
DEFAULT_LABEL = "all"  # value of an optional label column (domain, lang) a question file lacks

__all__ = [
    "LETTERS",
    "QUESTION_COLUMNS",
    "MultipleChoiceResults",
    "PerplexityResults",
    "SCORINGS",
    "answer_context",
    "format_prompt",
    "letter_token_ids",
    "load_questions",
    "load_texts",
    "multiple_choice_accuracy",
    "perplexity",
]


# ----------------------------------------------------------------------------- loading


def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """(columns, [(row number as a user counts it, row dict)]) of a CSV or JSONL file."""
    if not path.is_file():
        raise MoetraceError(f"{path}: expected an existing .csv or .jsonl file, found none")
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [(i + 2, row) for i, row in enumerate(reader)]  # line 1 is the header
        return columns, rows
    if path.suffix == ".jsonl":
        rows = read_json_objects(path)
        columns = dict.fromkeys(k for _, row in rows for k in row)
        return list(columns), rows
    raise MoetraceError(f"{path}: expected a .csv or .jsonl file, got suffix {path.suffix!r}")


def _cell(path: Path, where: str, row: Mapping, column: str, default: str | None = None) -> str:
    value = row.get(column, default)
    if value is None:
        raise MoetraceError(f"{path}: {where}: column {column!r}: expected a value, got none")
    if isinstance(value, (dict, list)):
        raise MoetraceError(f"{path}: {where}: column {column!r}: expected text, got {type(value).__name__}")
    return str(value)


def load_questions(path: str | Path) -> list[dict[str, str]]:
    """Read multiple-choice questions in MMLU format from a ``.csv`` or ``.jsonl`` file.

    Columns: ``question, A, B, C, D, answer`` (required; ``answer`` one of A-D, surrounding
    whitespace ignored, case-sensitive) and ``domain``, ``lang`` (optional; ``subject`` is
    accepted for ``domain``; a missing one is ``"all"``) and ``context`` (optional: the text an
    option's answer continues under answer scoring, for cloze questions; :func:`answer_context`). Returns a list of dicts of str with keys
    ``QUESTION_COLUMNS`` plus any other columns of the file. Raises MoetraceError naming the file,
    the row (CSV line / JSONL line) and the column of the first problem.
    """
    path = Path(path)
    columns, rows = _read_rows(path)
    missing = [c for c in _REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise MoetraceError(f"{path}: expected columns {list(_REQUIRED_COLUMNS)}, missing {missing} "
                            f"(found {columns})")
    if not rows:
        raise MoetraceError(f"{path}: expected at least one question, found none")
    domain_col = "domain" if "domain" in columns or "subject" not in columns else "subject"
    out = []
    for line, row in rows:
        where = f"line {line}"
        q = {str(k): "" if v is None else str(v) for k, v in row.items() if not isinstance(v, (dict, list))}
        for c in _REQUIRED_COLUMNS:
            q[c] = _cell(path, where, row, c)
        if not q["question"].strip():
            raise MoetraceError(f"{path}: {where}: column 'question': expected text, got an empty value")
        q["answer"] = q["answer"].strip()
        if q["answer"] not in LETTERS:
            raise MoetraceError(f"{path}: {where}: column 'answer': expected one of A, B, C, D, "
                                f"got {row.get('answer')!r}")
        q["domain"] = _cell(path, where, row, domain_col, DEFAULT_LABEL)
        q["lang"] = _cell(path, where, row, "lang", DEFAULT_LABEL)
        out.append(q)
    return out


def load_texts(path: str | Path) -> list[dict[str, str]]:
    """Read texts for :func:`perplexity` from JSONL: objects with ``text`` (required, non-empty),
    label keys such as ``domain``, ``lang`` (missing ``domain``/``lang`` become ``"all"``) and
    optionally ``answer_spans``: a list of ``[start, end)`` character offsets into ``text`` of the
    answers it states (loss is then also reported on those tokens apart from the rest).
    Raises MoetraceError naming the file, line and key of the first problem."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise MoetraceError(f"{path}: expected a .jsonl file of {{\"text\": ...}} objects, got suffix {path.suffix!r}")
    _columns, rows = _read_rows(path)
    if not rows:
        raise MoetraceError(f"{path}: expected at least one text, found none")
    out = []
    for line, row in rows:
        t = {str(k): str(v) for k, v in row.items() if not isinstance(v, (dict, list)) and v is not None}
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise MoetraceError(f"{path}: line {line}: key 'text': expected a non-empty string, got {text!r}")
        if "answer_spans" in row:
            t["answer_spans"] = _spans(row["answer_spans"], len(text), f"{path}: line {line}: key 'answer_spans'")
        t.setdefault("domain", DEFAULT_LABEL)
        t.setdefault("lang", DEFAULT_LABEL)
        out.append(t)
    return out


def _spans(value: Any, length: int, where: str) -> list[list[int]]:
    """``[[start, end], ...]`` with integer offsets, 0 <= start < end <= length."""
    ok = isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        and 0 <= p[0] < p[1] <= length for p in value)
    if not ok:
        raise MoetraceError(f"{where}: expected a list of [start, end] character offsets with "
                            f"0 <= start < end <= {length} (the text's length), got {value!r}")
    return [list(p) for p in value]


# ----------------------------------------------------------------------------- prompts


def _block(q: Mapping[str, str]) -> str:
    return (f"Question: {q['question']}\nA. {q['A']}\nB. {q['B']}\nC. {q['C']}\nD. {q['D']}\nAnswer:")


def format_prompt(question: Mapping[str, str], shots: Sequence[Mapping[str, str]] = ()) -> str:
    """The prompt for ``question`` (keys ``question, A, B, C, D``), after the solved ``shots``.

    Each shot is its block followed by ``" " + answer``; blocks are separated by a blank line.
    The prompt ends with ``"Answer:"``; the model's next token is scored.
    """
    return "\n\n".join([f"{_block(s)} {s['answer']}" for s in shots] + [_block(question)])


def letter_token_ids(tokenizer) -> np.ndarray:
    """int64 [4]: the token id of each answer letter A-D as it follows ``"Answer:"``.

    The last token of ``tokenizer.encode(" " + letter, add_special_tokens=False)``; raises
    MoetraceError when it does not decode to the letter or two letters share a token.
    """
    ids = []
    for letter in LETTERS:
        enc = tokenizer.encode(" " + letter, add_special_tokens=False)
        if not enc or tokenizer.decode([enc[-1]]).strip() != letter:
            raise MoetraceError(f"tokenizer: expected ' {letter}' to end in a token that decodes to {letter!r}, "
                                f"got ids {enc}")
        ids.append(enc[-1])
    if len(set(ids)) != len(ids):
        raise MoetraceError(f"tokenizer: expected four distinct answer-letter tokens, got ids {ids}")
    return np.asarray(ids, dtype=np.int64)


def _shot_indices(domains: np.ndarray, k: int) -> np.ndarray:
    """int64 [n, k]: for question i, the k questions after i (cyclically) among those of its domain."""
    n = len(domains)
    out = np.empty((n, k), dtype=np.int64)
    for value in np.unique(domains):
        members = np.flatnonzero(domains == value)
        if len(members) <= k:
            raise MoetraceError(f"k_shot: expected more than {k} questions of domain {value!r} to draw "
                                f"{k} shots from, got {len(members)}; pass shots=")
        ranks = np.arange(len(members))
        out[members] = members[(ranks[:, None] + 1 + np.arange(k)[None, :]) % len(members)]
    return out


# ----------------------------------------------------------------------------- shared batching


def _labels(items: Sequence[Mapping[str, str]], by: Sequence[str], what: str) -> dict[str, np.ndarray]:
    out = {}
    for name in by:
        missing = [i for i, it in enumerate(items) if name not in it]
        if missing:
            raise MoetraceError(f"by: expected every {what} to have a {name!r} value, {what} {missing[0]} has none")
        out[name] = np.asarray([str(it[name]) for it in items], dtype=str)
    return out


def _group_table(labels: dict[str, np.ndarray], columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sum ``columns`` (float/int [n]) within each distinct combination of ``labels`` (sorted)."""
    names = list(labels)
    if names:
        codes = [np.unique(labels[k], return_inverse=True) for k in names]
        keys = np.stack([inv for _u, inv in codes], axis=1)
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        out = {k: codes[j][0][uniq[:, j]] for j, k in enumerate(names)}
    else:
        inverse = np.zeros(len(next(iter(columns.values()))), dtype=np.int64)
        uniq, out = np.zeros((1, 0)), {}
    for k, v in columns.items():
        out[k] = np.bincount(inverse, weights=v, minlength=len(uniq))
    return out


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters: where its inputs must go."""
    return next(model.parameters()).device


def _capture_context(model, store, capture_fn, by: Sequence[str], tokenizer=None):
    from moetrace.capture import capture

    if capture_fn is None and store is None:
        return contextlib.nullcontext(None)
    if capture_fn is None or capture_fn is capture:  # moetrace's own: the store records the tokenizer too
        return capture(model, store, labels=list(by), tokenizer=tokenizer)
    return capture_fn(model, store, labels=list(by))


def _append_sequences(store, columns: dict[str, np.ndarray]) -> None:
    """Append per-sequence results to ``store`` (a TraceStore or a path), after capture closed it."""
    from moetrace.store import TraceStore

    if isinstance(store, TraceStore):
        store.append_sequences(columns)
        store.flush()
    else:
        with TraceStore.open(store, mode="a") as opened:
            opened.append_sequences(columns)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids int64 [B, T], mask int64 [B, T]) of token lists padded to the longest."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max())
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    cols = np.arange(width)[None, :]
    mask = (cols >= width - lengths[:, None]) if left else (cols < lengths[:, None])
    ids[mask] = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs])
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _encode(tokenizer, texts: list[str], what: str) -> list[list[int]]:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    empty = [i for i, s in enumerate(ids) if len(s) == 0]
    if empty:
        raise MoetraceError(f"{what} {empty[0]}: expected text that tokenizes to at least one token, got none")
    return ids


# ----------------------------------------------------------------------------- multiple choice


@dataclass
class MultipleChoiceResults:
    """What :func:`multiple_choice_accuracy` measured.

    ``table`` (one row per question, in input order): ``q`` int64 question index; one str column
    per ``by`` label; ``answer`` and ``predicted`` str (letters); ``correct`` bool; ``scores``
    float32 [n, 4] (what the prediction maximizes: the options' summed answer log-likelihoods for
    ``"answer"`` scoring, the A-D token logits for ``"letter"``). Letter scoring adds
    ``output_token`` str (the vocabulary argmax decoded), ``output_token_id`` int64 and
    ``letter_logits`` (= ``scores``).
    ``groups`` (one row per distinct ``by`` combination, sorted): the ``by`` columns, ``n`` int64,
    ``correct`` int64, ``accuracy`` float64. ``scoring``: ``"answer"`` or ``"letter"``.
    """

    table: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]
    by: tuple[str, ...]
    scoring: str = "answer"

    @property
    def accuracy(self) -> float:
        """Overall share of questions answered correctly."""
        return float(self.table["correct"].mean())

    def by_group(self) -> dict[tuple[str, ...], float]:
        """{(label values...): accuracy} for every group."""
        keys = zip(*(self.groups[k].tolist() for k in self.by)) if self.by else [()] * len(self.groups["n"])
        return {tuple(k): float(a) for k, a in zip(keys, self.groups["accuracy"])}


def answer_context(question: Mapping[str, str], *, blind: bool = False) -> str:
    """The text each option's answer continues under ``"answer"`` scoring (module docstring).

    ``question["context"]`` when present and non-empty (cloze form), else
    ``"Question: <question>\nAnswer:"``. ``blind``: the question removed (``""`` for a cloze
    question, ``"Answer:"`` otherwise).
    """
    cloze = bool(str(question.get("context", "")).strip())
    if blind:
        return "" if cloze else "Answer:"
    return str(question["context"]).rstrip() if cloze else f"Question: {question['question']}\nAnswer:"


def _prompts(questions: Sequence[Mapping[str, str]], k_shot: int,
             shots: Sequence[Mapping[str, str]] | None) -> list[str]:
    """The letter-scoring prompt of every question, with its k-shot examples."""
    if k_shot == 0:
        return [format_prompt(q) for q in questions]
    if shots is None:
        idx = _shot_indices(np.asarray([q.get("domain", DEFAULT_LABEL) for q in questions], dtype=str), k_shot)
        return [format_prompt(q, [questions[j] for j in row]) for q, row in zip(questions, idx.tolist())]
    pools: dict[str, list] = {}
    for s in shots:
        pools.setdefault(s.get("domain", DEFAULT_LABEL), []).append(s)
    prompts = []
    for q in questions:
        pool = pools.get(q.get("domain", DEFAULT_LABEL), [])
        if len(pool) < k_shot:
            raise MoetraceError(f"shots: expected at least {k_shot} shots of domain {q.get('domain')!r}, "
                                f"got {len(pool)}")
        prompts.append(format_prompt(q, pool[:k_shot]))
    return prompts


def _letter_scores(model, tokenizer, prompts: list[str], batch_size: int, progress: bool, cap,
                   labels: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(A-D token logits float32 [n, 4], vocabulary argmax int64 [n]) at the end of each prompt."""
    letter_ids = torch.from_numpy(letter_token_ids(tokenizer))
    encoded = _encode(tokenizer, prompts, "question")
    lengths = np.fromiter((len(s) for s in encoded), dtype=np.int64, count=len(encoded))
    order = np.argsort(-lengths, kind="stable")  # long prompts first: little padding per batch
    n = len(prompts)
    letter_logits = np.zeros((n, len(LETTERS)), dtype=np.float32)
    output_ids = np.zeros(n, dtype=np.int64)
    device, pad_id = model_device(model), _pad_id(tokenizer)
    for start in tqdm(range(0, n, batch_size), desc="multiple choice", disable=not progress, unit="batch"):
        rows = order[start:start + batch_size]
        ids, mask = _pad([encoded[i] for i in rows], pad_id, left=True)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        if cap is not None:
            cap.set_batch(seq=rows.astype(np.int64), labels={k: v[rows] for k, v in labels.items()})
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    position_ids=positions.to(device), logits_to_keep=1, use_cache=False)
        last = out.logits[:, -1, :].float().cpu()
        letter_logits[rows] = last[:, letter_ids].numpy()
        output_ids[rows] = last.argmax(dim=-1).numpy()
    return letter_logits, output_ids


def _answer_scores(model, tokenizer, questions: Sequence[Mapping[str, str]], batch_size: int, progress: bool,
                   blind: bool) -> np.ndarray:
    """float32 [n, 4]: each option's summed next-token log-probability after :func:`answer_context`.

    An option with tokens o_1..o_m after context tokens c is scored from one forward pass over
    ``c + o_1..o_{m-1}`` (log p(o_j | c, o_<j) read at the positions before each o_j); identical
    inputs (the options of one token of a question share ``c``) run once.
    """
    contexts = [answer_context(q, blind=blind) for q in questions]
    unique_contexts = list(dict.fromkeys(contexts))
    context_ids = dict(zip(unique_contexts, tokenizer(unique_contexts, add_special_tokens=True)["input_ids"]))
    options = [str(q[letter]) for q in questions for letter in LETTERS]
    unique_options = list(dict.fromkeys(options))
    option_ids = dict(zip(unique_options, tokenizer([" " + o for o in unique_options],
                                                    add_special_tokens=False)["input_ids"]))
    inputs: dict[tuple[int, ...], int] = {}
    plan = []  # (question, option, input index, first position, option token ids)
    for i, (q, ctx) in enumerate(zip(questions, contexts)):
        c = context_ids[ctx]
        if not c:
            raise MoetraceError(f"question {i}: expected an answer context that tokenizes to at least one token "
                                f"(or a tokenizer that adds a BOS token), got none for {ctx!r}")
        for j, letter in enumerate(LETTERS):
            o = option_ids[str(q[letter])]
            if not o:
                raise MoetraceError(f"question {i}: option {letter}: expected text that tokenizes to at least one "
                                    f"token, got {q[letter]!r}")
            key = tuple(c + o[:-1])
            plan.append((i, j, inputs.setdefault(key, len(inputs)), len(c) - 1, o))
    seqs = list(inputs)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    order = np.argsort(-lengths, kind="stable")
    device, pad_id = model_device(model), _pad_id(tokenizer)
    needed: dict[int, list[tuple[int, int, int, list[int]]]] = {}
    for i, j, k, first, o in plan:
        needed.setdefault(k, []).append((i, j, first, o))
    scores = np.zeros((len(questions), len(LETTERS)), dtype=np.float64)
    for start in tqdm(range(0, len(seqs), batch_size), desc="answer scoring", disable=not progress, unit="batch"):
        rows = order[start:start + batch_size]
        ids, mask = _pad([seqs[k] for k in rows], pad_id, left=False)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for b, k in enumerate(rows.tolist()):
            for i, j, first, o in needed[k]:
                positions = torch.arange(first, first + len(o))
                scores[i, j] = float(logp[b, positions, torch.as_tensor(o)].double().sum())
    return scores.astype(np.float32)


def multiple_choice_accuracy(model, tokenizer, questions: Sequence[Mapping[str, str]], *, scoring: str = "answer",
                             answer_blind: bool = False, k_shot: int = 0,
                             shots: Sequence[Mapping[str, str]] | None = None, batch_size: int = 16,
                             by: Sequence[str] = ("domain", "lang"), progress: bool = True,
                             store=None, capture_fn: Callable | None = None) -> MultipleChoiceResults:
    """Multiple-choice accuracy of a causal LM, by answer likelihood or by answer letter.

    questions: dicts with ``question, A, B, C, D, answer``, the ``by`` labels and optionally
    ``context`` (see :func:`load_questions`). scoring: ``"answer"`` (default) or ``"letter"``
    (module docstring). answer_blind: with ``"answer"`` scoring, score the options with the
    question removed (:func:`answer_context`). k_shot (letter scoring): solved examples before
    each question, taken from ``shots`` (the first ``k_shot`` of the same domain) or, when
    ``shots`` is None, from ``questions`` itself (the ``k_shot`` questions after it, cyclically,
    within its domain; never itself). batch_size: inputs per forward pass. by: label names to
    group accuracy by. progress: tqdm bar. store / capture_fn (letter scoring): capture the
    routing of every prompt token into ``store`` (module docstring); per-question results are
    then appended with ``append_sequences`` (``seq``, ``answer_char``, ``predicted``,
    ``output_token``, ``correct``).

    Returns :class:`MultipleChoiceResults`.
    """
    if not questions:
        raise MoetraceError("questions: expected at least one question, got none")
    if scoring not in SCORINGS:
        raise MoetraceError(f"scoring: expected one of {list(SCORINGS)}, got {scoring!r}")
    if batch_size < 1:
        raise MoetraceError(f"batch_size: expected a positive integer, got {batch_size}")
    if k_shot < 0:
        raise MoetraceError(f"k_shot: expected a non-negative integer, got {k_shot}")
    if scoring == "answer" and (k_shot or store is not None or capture_fn is not None):
        raise MoetraceError("scoring='answer' takes no k_shot and captures nothing: use scoring='letter' for "
                            "k-shot prompts or capture, or capture texts with perplexity(store=...)")
    if answer_blind and scoring != "answer":
        raise MoetraceError("answer_blind: only answer scoring has an answer-blind baseline, got scoring='letter'")
    by = tuple(by)
    labels = _labels(questions, by, "question")
    answers = np.asarray([q["answer"] for q in questions], dtype=str)
    bad = np.flatnonzero(~np.isin(answers, LETTERS))
    if len(bad):
        raise MoetraceError(f"questions: question {bad[0]}: answer: expected one of A-D, got {answers[bad[0]]!r}")
    n = len(questions)
    extra: dict[str, np.ndarray] = {}
    with _eval_mode(model):
        if scoring == "answer":
            scores = _answer_scores(model, tokenizer, questions, batch_size, progress, answer_blind)
        else:
            with _capture_context(model, store, capture_fn, by, tokenizer) as cap:
                scores, output_ids = _letter_scores(model, tokenizer, _prompts(questions, k_shot, shots),
                                                    batch_size, progress, cap, labels)
            extra = {"output_token": np.asarray([tokenizer.decode([int(t)]) for t in output_ids], dtype=str),
                     "output_token_id": output_ids, "letter_logits": scores}

    predicted = np.asarray(LETTERS)[scores.argmax(axis=1)]
    correct = predicted == answers
    table = {"q": np.arange(n, dtype=np.int64), **labels, "answer": answers, "predicted": predicted,
             "correct": correct, "scores": scores, **extra}
    groups = _group_table(labels, {"n": np.ones(n), "correct": correct.astype(np.float64)})
    groups["n"] = groups["n"].astype(np.int64)
    groups["correct"] = groups["correct"].astype(np.int64)
    groups["accuracy"] = groups["correct"] / groups["n"]
    if store is not None:
        _append_sequences(store, {"seq": table["q"], "answer_char": answers, "predicted": predicted,
                                  "output_token": extra["output_token"], "correct": correct})
    return MultipleChoiceResults(table=table, groups=groups, by=by, scoring=scoring)


# ----------------------------------------------------------------------------- perplexity


@dataclass
class PerplexityResults:
    """What :func:`perplexity` measured.

    ``table`` (one row per text, input order): ``text`` int64 index; one str column per ``by``
    label; ``n_tokens`` int64 (predicted tokens: the text's tokens minus the first); ``nll`` float64
    (summed next-token negative log-likelihood, nats); ``loss`` float64 (``nll / n_tokens``).
    When the texts carry ``answer_spans``, the table also splits each text's predicted tokens
    into answer tokens (a token whose characters overlap an answer span) and the rest:
    ``n_answer_tokens`` / ``answer_nll`` / ``answer_loss`` and ``n_other_tokens`` / ``other_nll`` /
    ``other_loss`` (loss NaN for a text without such tokens).
    ``groups`` (one row per distinct ``by`` combination, sorted): the ``by`` columns, ``n_texts``,
    ``n_tokens`` int64, ``loss`` float64 (token-weighted mean: summed nll / summed tokens) and
    ``perplexity`` float64 (``exp(loss)``).
    """

    table: dict[str, np.ndarray]
    groups: dict[str, np.ndarray]
    by: tuple[str, ...]

    @property
    def loss(self) -> float:
        """Token-weighted mean next-token loss over all texts (nats)."""
        return float(self.table["nll"].sum() / self.table["n_tokens"].sum())

    def by_group(self) -> dict[tuple[str, ...], float]:
        """{(label values...): mean loss} for every group."""
        keys = zip(*(self.groups[k].tolist() for k in self.by)) if self.by else [()] * len(self.groups["loss"])
        return {tuple(k): float(v) for k, v in zip(keys, self.groups["loss"])}


def _answer_token_masks(tokenizer, texts: Sequence[Mapping], encoded: list[list[int]]) -> list[np.ndarray]:
    """Per text, int64 [n_tokens]: 1 where the token's characters overlap one of its ``answer_spans``."""
    if not getattr(tokenizer, "is_fast", False):
        raise MoetraceError("texts: answer_spans need a fast tokenizer (character offsets of each token), "
                            f"got {type(tokenizer).__name__}")
    offsets = tokenizer([t["text"] for t in texts], add_special_tokens=True,
                        return_offsets_mapping=True)["offset_mapping"]
    masks = []
    for t, ids, offs in zip(texts, encoded, offsets):
        off = np.asarray(offs, dtype=np.int64).reshape(-1, 2)
        m = np.zeros(len(ids), dtype=np.int64)
        for a, b in t.get("answer_spans", ()):
            m |= ((off[:, 0] < b) & (off[:, 1] > a)).astype(np.int64)  # a special token's (0, 0) never overlaps
        masks.append(m)
    return masks


def perplexity(model, tokenizer, texts: Sequence[Mapping[str, str]], *, by: Sequence[str] = ("domain", "lang"),
               batch_size: int = 16, progress: bool = True, store=None,
               capture_fn: Callable | None = None) -> PerplexityResults:
    """Per-group mean next-token loss and perplexity of a causal LM on ``texts``.

    texts: dicts with ``text`` and the ``by`` labels (see :func:`load_texts`), each tokenized with
    the tokenizer's special tokens (e.g. a BOS) and scored on every token after the first. A text
    of one token is an error (nothing to predict). batch_size: texts per forward pass (right
    padded). store / capture_fn: capture routing as in :func:`multiple_choice_accuracy`
    (``seq`` = text index).

    Returns :class:`PerplexityResults`.
    """
    if not texts:
        raise MoetraceError("texts: expected at least one text, got none")
    if batch_size < 1:
        raise MoetraceError(f"batch_size: expected a positive integer, got {batch_size}")
    by = tuple(by)
    labels = _labels(texts, by, "text")
    encoded = _encode(tokenizer, [t["text"] for t in texts], "text")
    answer_masks = _answer_token_masks(tokenizer, texts, encoded) if any("answer_spans" in t for t in texts) else None
    lengths = np.fromiter((len(s) for s in encoded), dtype=np.int64, count=len(encoded))
    short = np.flatnonzero(lengths < 2)
    if len(short):
        raise MoetraceError(f"texts: text {short[0]}: expected at least 2 tokens to score, got {lengths[short[0]]}")
    order = np.argsort(-lengths, kind="stable")
    n = len(texts)
    nll = np.zeros(n, dtype=np.float64)
    answer_nll = np.zeros(n, dtype=np.float64)
    device, pad_id = model_device(model), _pad_id(tokenizer)

    with _eval_mode(model), _capture_context(model, store, capture_fn, by, tokenizer) as cap:
        for start in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, unit="batch"):
            rows = order[start:start + batch_size]
            ids, mask = _pad([encoded[i] for i in rows], pad_id, left=False)
            if cap is not None:
                cap.set_batch(seq=rows.astype(np.int64), labels={k: v[rows] for k, v in labels.items()})
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1).cpu()
            token_nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
            nll[rows] = token_nll.sum(dim=1).double().numpy()
            if answer_masks is not None:
                is_answer, _ = _pad([answer_masks[i] for i in rows], 0, left=False)
                answer_nll[rows] = (token_nll * is_answer[:, 1:]).sum(dim=1).double().numpy()

    n_tokens = lengths - 1
    table = {"text": np.arange(n, dtype=np.int64), **labels, "n_tokens": n_tokens, "nll": nll,
             "loss": nll / n_tokens}
    if answer_masks is not None:
        n_answer = np.fromiter((int(np.sum(m[1:])) for m in answer_masks), dtype=np.int64, count=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            table.update(n_answer_tokens=n_answer, answer_nll=answer_nll, answer_loss=answer_nll / n_answer,
                         n_other_tokens=n_tokens - n_answer, other_nll=nll - answer_nll,
                         other_loss=(nll - answer_nll) / (n_tokens - n_answer))
    groups = _group_table(labels, {"n_texts": np.ones(n), "n_tokens": n_tokens.astype(np.float64), "nll": nll})
    groups["n_texts"] = groups["n_texts"].astype(np.int64)
    groups["n_tokens"] = groups["n_tokens"].astype(np.int64)
    groups["loss"] = groups.pop("nll") / groups["n_tokens"]
    groups["perplexity"] = np.exp(groups["loss"])
    return PerplexityResults(table=table, groups=groups, by=by)

