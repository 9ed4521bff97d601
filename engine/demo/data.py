"""Synthetic multi-domain, multi-language text and multiple-choice questions for the demo model.

Four domains, each in two surface languages (``en``: English-like, ``de``: German-like wording;
the content of a domain is the same kind in both, only the words differ):

- ``arith``: ``compute 6 minus 2 equals 4`` / ``rechne 6 weniger 2 ergibt 4``
- ``code``: ``print ( double ( 0x4 ) ) -> 0x8``, ``print ( max ( 0x3 , 0x7 ) ) -> 0x7`` /
  ``drucke ( verdopple ( 0x4 ) ) -> 0x8``
- ``facts``: ``mara lives in velm``, ``mara works as baker`` / ``mara wohnt in velm``,
  ``mara arbeitet als baecker``
- ``dates``: ``march is month three``, ``month three is march``, ``day after sunday is day one``,
  ``day before monday is sunday`` / ``maerz ist monat drei``, ``monat vor maerz ist februar``

``facts`` come from a small knowledge base (64 people, their city and job) drawn from the seed;
the other domains are computed (addition/subtraction of numbers 0..9; functions inc/dec/double
of a number and max/min of two; the number of a weekday or month, its name from its number, and
the number or name of the one just after or before it: offsets of 2 and 3 were in version 9,
where a 2000-step model stayed at chance on dates). Each (domain, lang) has at least 114 distinct
questions, so 100 of them can be held out for evaluation with some left for training examples.

A multiple-choice question is a statement with its answer replaced by ``?`` (the cloze form)
and four choices in MMLU format: a dict with keys ``question, A, B, C, D, answer, domain, lang,
context``, where ``context`` is the statement before its answer (what answer scoring continues,
``moetrace.evaluate.answer_context``).
The choices are the aligned block of four consecutive values of the domain's ordered answer
space that holds the answer (numbers 0-3, 4-7, ..., 15-18 in the domain's numerals; cities and
jobs in their fixed order, 4 at a time), in order: neighbouring values are
the distractors and the answer's letter is a function of the answer alone, so a model that knows
the answer can name the letter without comparing tokens. That keeps the letter learnable in the
few training minutes the demo has (with distractors in random order or random windows, a 4-layer
model trained that long stays near chance on the letters while it already knows most answers:
the letter then hinges on matching the answer against the choices, which it learns last).
Without the knowledge the block gives no hint beyond the prior over answers.
The training documents mix plain statements with multiple-choice examples rendered by
:func:`moetrace.evaluate.format_prompt` followed by the answer letter, so the model learns the
format; evaluation questions are excluded from them (no training prompt equals an evaluation
prompt).

Everything is a pure function of ``seed`` (``random.Random`` seeded by strings, whose seeding is
stable across Python runs and versions), so the same seed gives the same data byte for byte.

The tokenizer is word level (``tokenizers`` WordLevel + Whitespace pre-tokenizer, which splits
``\\w+`` runs and punctuation runs), wrapped as a ``PreTrainedTokenizerFast`` that prepends
``[BOS]``; its vocabulary is the closed list :func:`demo_vocabulary`, so the generated text never
contains ``[UNK]``.
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moetrace.errors import MoetraceError
from moetrace.evaluate import LETTERS, QUESTION_COLUMNS, format_prompt

DOMAINS = ("arith", "code", "facts", "dates")
LANGS = ("en", "de")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

_MAX_NUMBER = 18  # answers: sums of two operands up to 9, doubled digits up to 18
_MAX_OPERAND = 9
_WORDS = {
    "en": {
        "compute": "compute", "plus": "plus", "minus": "minus", "equals": "equals",
        "print": "print", "inc": "inc", "dec": "dec", "double": "double", "max": "max", "min": "min",
        "lives": "lives in", "works": "works as",
        "day": "day", "month": "month", "days": "days", "months": "months",
        "after": "after", "before": "before", "is": "is",
    },
    "de": {
        "compute": "rechne", "plus": "und", "minus": "weniger", "equals": "ergibt",
        "print": "drucke", "inc": "erhoehe", "dec": "senke", "double": "verdopple",
        "max": "groesste", "min": "kleinste",
        "lives": "wohnt in", "works": "arbeitet als",
        "day": "tag", "month": "monat", "days": "tage", "months": "monate",
        "after": "nach", "before": "vor", "is": "ist",
    },
}
_DAYS = {
    "en": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "de": ("montag", "dienstag", "mittwoch", "donnerstag", "freitag", "samstag", "sonntag"),
}
_MONTHS = {
    "en": ("january", "february", "march", "april", "may", "june", "july", "august",
           "september", "october", "november", "december"),
    "de": ("januar", "februar", "maerz", "april", "mai", "juni", "juli", "august",
           "september", "oktober", "november", "dezember"),
}
_JOBS = {
    "en": ("baker", "doctor", "farmer", "teacher", "painter", "tailor", "singer", "fisher"),
    "de": ("baecker", "arzt", "bauer", "lehrer", "maler", "schneider", "saenger", "fischer"),
}
_PEOPLE = ("mara", "tomas", "ilse", "jonas", "lena", "piet", "anja", "karl",
           "nora", "emil", "greta", "oskar", "rosa", "felix", "hanna", "bruno",
           "ida", "lars", "vera", "otto", "frida", "hugo", "lotte", "sven",
           "alma", "bert", "clara", "dirk", "edda", "finn", "gerd", "hilde",
           "ivo", "jule", "kai", "lina", "malte", "nele", "ole", "paula",
           "quirin", "rike", "silas", "tilda", "ulf", "vita", "wim", "xenia",
           "yann", "zoe", "arne", "britt", "carl", "dora", "enno", "fee",
           "gus", "hedda", "ilka", "jost", "kira", "leif", "mia", "nils")
_CITIES = ("velm", "ostra", "karnis", "brodo", "miral", "tessin", "uldor", "zarak")
_SYMBOLS = ("(", ")", "[", "]", "->", "?", ".", ":", ",")
# Each domain writes its numbers its own way, as real domains do (digits in arithmetic, hex
# literals in code, number words in dates): a number token then belongs to one domain, so the
# experts that process operands can specialize in it (with shared digits they served three
# domains at once). bench/RESULTS.md (issue 15) compares both on the ablation experiment.
_DIGITS = tuple(str(i) for i in range(_MAX_NUMBER + 1))
_HEX = tuple(hex(i) for i in range(_MAX_NUMBER + 1))
_NUMBER_WORDS = {
    "en": ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"),
    "de": ("eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben", "acht", "neun", "zehn", "elf", "zwoelf"),
}


def _rng(seed: int, stream: str) -> random.Random:
    """An independent, reproducible random stream for ``(seed, stream)``."""
    return random.Random(f"moetrace-demo:{int(seed)}:{stream}")


def knowledge_base(seed: int = 0) -> dict[str, dict[str, int]]:
    """The facts of the ``facts`` domain: person -> {"city": index into cities, "job": index into jobs}.

    Jobs index the per-language job words (``baker`` in en is ``baecker`` in de).
    """
    rng = _rng(seed, "kb")
    return {p: {"city": rng.randrange(len(_CITIES)), "job": rng.randrange(len(_JOBS["en"]))} for p in _PEOPLE}


def _block_choices(answer: str, ordered: Sequence[str], cyclic: bool) -> tuple[list[str], int]:
    """Four choices: the aligned block of 4 consecutive values of ``ordered`` that holds ``answer``.

    Blocks start at multiples of 4 (``ordered[0:4]``, ``ordered[4:8]``, ...); the last block
    wraps around to the start when ``cyclic`` (weekdays: friday, saturday, sunday, monday) and
    is otherwise shifted back to end at the last value (numbers). Returns (choices, index of the
    answer).
    """
    n, i = len(ordered), ordered.index(answer)
    start = i - i % 4
    if not cyclic:
        start = min(start, n - 4)
    choices = [ordered[(start + j) % n] for j in range(4)]
    return choices, choices.index(answer)


def _sample_item(domain: str, lang: str, rng: random.Random, kb: Mapping) -> tuple[str, str, list[str], bool]:
    """One random fact of ``domain`` in ``lang``: (prefix, answer, ordered answer space, cyclic).

    The statement is ``prefix + " " + answer``; the question is ``prefix + " ?"``; the choices are a
    block of the ordered answer space (:func:`_block_choices`).
    """
    w = _WORDS[lang]
    if domain == "arith":
        a = rng.randrange(_MAX_OPERAND + 1)
        if rng.random() < 0.5:
            b = rng.randrange(_MAX_OPERAND + 1)
            c, op = a + b, w["plus"]
        else:
            b = rng.randrange(a + 1)
            c, op = a - b, w["minus"]
        return f"{w['compute']} {a} {op} {b} {w['equals']}", str(c), _DIGITS, False
    if domain == "code":
        op = rng.choice(("inc", "dec", "double", "max", "min"))
        if op in ("max", "min"):
            a, b = rng.randrange(_MAX_OPERAND + 1), rng.randrange(_MAX_OPERAND + 1)
            c = max(a, b) if op == "max" else min(a, b)
            return f"{w['print']} ( {w[op]} ( {_HEX[a]} , {_HEX[b]} ) ) ->", _HEX[c], _HEX, False
        x = rng.randrange(1, _MAX_NUMBER + 1) if op == "dec" else rng.randrange(_MAX_NUMBER if op == "inc" else 10)
        c = {"inc": x + 1, "dec": x - 1, "double": 2 * x}[op]
        return f"{w['print']} ( {w[op]} ( {_HEX[x]} ) ) ->", _HEX[c], _HEX, False
    if domain == "facts":
        person = rng.choice(_PEOPLE)
        if rng.random() < 0.5:
            return f"{person} {w['lives']}", _CITIES[kb[person]["city"]], _CITIES, True
        return f"{person} {w['works']}", _JOBS[lang][kb[person]["job"]], _JOBS[lang], True
    if domain == "dates":
        months = rng.random() < 0.5
        names = _MONTHS[lang] if months else _DAYS[lang]
        unit, numbers = w["month" if months else "day"], _NUMBER_WORDS[lang]
        start, form = rng.randrange(len(names)), rng.randrange(6)
        if form == 0:  # "march is month three"
            return f"{names[start]} {w['is']} {unit}", numbers[start], numbers, False
        if form == 1:  # "month three is march"
            return f"{unit} {numbers[start]} {w['is']}", names[start], names, True
        sign, as_name = (1 if form % 2 else -1), form >= 4
        c = (start + sign) % len(names)
        prefix = f"{unit} {w['after' if sign > 0 else 'before']} {names[start]} {w['is']}"
        if as_name:  # "month after march is april", "day before monday is sunday"
            return prefix, names[c], names, True
        return f"{prefix} {unit}", numbers[c], numbers, False  # "month after march is month four"
    raise MoetraceError(f"domain: expected one of {list(DOMAINS)}, got {domain!r}")


def _make_question(domain: str, lang: str, rng: random.Random, kb: Mapping) -> dict[str, str]:
    prefix, answer, ordered, cyclic = _sample_item(domain, lang, rng, kb)
    choices, k = _block_choices(answer, ordered, cyclic)
    q = {"question": f"{prefix} ?", **dict(zip(LETTERS, choices))}
    q.update(answer=LETTERS[k], domain=domain, lang=lang, context=prefix)
    return q


def _groups() -> list[tuple[str, str]]:
    return [(d, lang) for d in DOMAINS for lang in LANGS]


def make_questions(n_per_group: int = 20, seed: int = 0) -> list[dict[str, str]]:
    """The evaluation questions: ``n_per_group`` distinct questions per (domain, lang).

    Returns a list of dicts with keys ``question, A, B, C, D, answer, domain, lang`` (all str),
    ordered by domain then lang (``DOMAINS`` x ``LANGS``). Within a group no two rendered prompts
    are equal.
    """
    if n_per_group < 1:
        raise MoetraceError(f"n_per_group: expected a positive integer, got {n_per_group}")
    kb, rng = knowledge_base(seed), _rng(seed, "eval")
    out = []
    for domain, lang in _groups():
        seen: set[str] = set()
        for _ in range(200 * n_per_group):
            if len(seen) == n_per_group:
                break
            q = _make_question(domain, lang, rng, kb)
            prompt = format_prompt(q)
            if prompt not in seen:
                seen.add(prompt)
                out.append(q)
        if len(seen) < n_per_group:
            raise MoetraceError(f"n_per_group: only {len(seen)} distinct {domain}/{lang} questions exist, "
                                f"asked for {n_per_group}")
    return out


def _statements(domain: str, lang: str, rng: random.Random, kb: Mapping, n: int) -> tuple[str, list[list[int]]]:
    """``n`` random statements joined by ``" . "`` and the [start, end) character span of each answer."""
    parts, spans, at = [], [], 0
    for _ in range(n):
        prefix, answer, _ordered, _cyclic = _sample_item(domain, lang, rng, kb)
        start = at + len(prefix) + 1
        spans.append([start, start + len(answer)])
        parts.append(f"{prefix} {answer}")
        at += len(parts[-1]) + len(" . ")
    return " . ".join(parts) + " .", spans


def make_texts(n_per_group: int = 20, seed: int = 0, statements_per_text: int = 3, stream: str = "texts",
               exclude: Iterable[Mapping[str, Any]] = ()) -> list[dict]:
    """Plain-text documents for perplexity: dicts ``{"text", "domain", "lang", "answer_spans"}``.

    Each text is ``statements_per_text`` random statements of one (domain, lang) joined by
    ``" . "``; ``answer_spans`` holds the [start, end) character span of each statement's answer
    (what a question about it would ask), so loss can be reported on the answers apart from the
    rest. ``n_per_group`` texts per group, ordered by domain then lang. ``stream`` names the random
    stream: texts of different streams are drawn independently (the demo selects its targets on
    one stream and evaluates on another); a text equal to one in ``exclude`` is redrawn.
    """
    kb, rng = knowledge_base(seed), _rng(seed, stream)
    banned = {t["text"] for t in exclude}
    out = []
    for d, lang in _groups():
        for _ in range(n_per_group):
            for _ in range(1000):
                text, spans = _statements(d, lang, rng, kb, statements_per_text)
                if text not in banned:
                    break
            else:
                raise MoetraceError(f"exclude: every {d}/{lang} text drawn is excluded; expected fewer excluded texts")
            out.append({"text": text, "domain": d, "lang": lang, "answer_spans": spans})
    return out


def make_training_documents(n_docs: int, seed: int = 0, mc_fraction: float = 0.5,
                            statements_per_doc: int = 3,
                            exclude: Iterable[Mapping[str, str]] = ()) -> list[dict[str, str]]:
    """The training corpus: ``n_docs`` dicts ``{"text", "domain", "lang", "kind"}``.

    Groups (domain x lang) take turns, so each gets ``n_docs / 8`` documents (+-1); in each group
    a ``mc_fraction`` share (every other document for 0.5) is a multiple-choice example
    (``format_prompt(q) + " " + q["answer"]``, kind ``"mc"``), the rest ``statements_per_doc``
    statements (kind ``"text"``). Multiple-choice examples whose prompt equals the prompt of a
    question in ``exclude`` (normally the evaluation set) are redrawn. The order is shuffled with
    the seed.
    """
    if not 0.0 <= mc_fraction <= 1.0:
        raise MoetraceError(f"mc_fraction: expected a number in [0, 1], got {mc_fraction}")
    kb, rng = knowledge_base(seed), _rng(seed, "train")
    banned = {format_prompt(q) for q in exclude}
    groups = _groups()
    docs = []
    for i in range(n_docs):
        domain, lang = groups[i % len(groups)]
        k = i // len(groups)
        if int((k + 1) * mc_fraction) > int(k * mc_fraction):
            for _ in range(1000):
                q = _make_question(domain, lang, rng, kb)
                prompt = format_prompt(q)
                if prompt not in banned:
                    break
            else:
                raise MoetraceError(f"exclude: every {domain}/{lang} multiple-choice question is excluded; "
                                    "expected fewer evaluation questions per group")
            docs.append({"text": f"{prompt} {q['answer']}", "domain": domain, "lang": lang, "kind": "mc"})
        else:
            docs.append({"text": _statements(domain, lang, rng, kb, statements_per_doc)[0],
                         "domain": domain, "lang": lang, "kind": "text"})
    rng.shuffle(docs)
    return docs


def demo_vocabulary() -> list[str]:
    """Every token the generator and the prompt format can produce, special tokens first.

    The order is fixed (it defines the token ids): specials, then the prompt words, symbols,
    digits 0..18 and hex literals 0x0..0x12, then each language's words, number words, weekdays,
    months and jobs, then people and cities.
    """
    words: list[str] = [*SPECIAL_TOKENS, "Question", "Answer", *LETTERS, *_SYMBOLS, *_DIGITS, *_HEX]
    for lang in LANGS:
        for phrase in _WORDS[lang].values():
            words += phrase.split()
        words += [*_NUMBER_WORDS[lang], *_DAYS[lang], *_MONTHS[lang], *_JOBS[lang]]
    words += [*_PEOPLE, *_CITIES]
    return list(dict.fromkeys(words))


def build_tokenizer():
    """A word-level ``transformers.PreTrainedTokenizerFast`` over :func:`demo_vocabulary`.

    Splits on whitespace and between word characters and punctuation, prepends ``[BOS]``
    (``add_special_tokens=True``), pads with ``[PAD]`` (id 0). Save it with ``save_pretrained``;
    ``AutoTokenizer.from_pretrained`` loads it back.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(demo_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A $B", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="[BOS]", eos_token="[EOS]", padding_side="right")


def write_questions(path: str | Path, questions: Sequence[Mapping[str, str]]) -> Path:
    """Write questions in MMLU format to ``path``: ``.jsonl`` (one object a line) or ``.csv``.

    Columns / keys, in order: ``question, A, B, C, D, answer, domain, lang``, then ``context``
    when the questions have one.
    """
    path = Path(path)
    columns = [*QUESTION_COLUMNS, *(["context"] if questions and "context" in questions[0] else [])]
    rows = [{c: str(q[c]) for c in columns} for q in questions]
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise MoetraceError(f"{path}: expected a .jsonl or .csv file name, got suffix {path.suffix!r}")
    return path


def write_texts(path: str | Path, texts: Sequence[Mapping[str, str]]) -> Path:
    """Write texts as JSONL, one ``{"text", "domain", "lang"}`` object a line (plus ``answer_spans``
    when the text has them)."""
    path = Path(path)
    keys = ("text", "domain", "lang", "answer_spans")
    path.write_text("".join(json.dumps({k: t[k] for k in keys if k in t}, ensure_ascii=False) + "\n"
                            for t in texts), encoding="utf-8")
    return path
