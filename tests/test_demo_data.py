"""The demo data generator: determinism, correct answers (re-derived by parsing), tokenizer, writers."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.demo.data import (
    DOMAINS,
    LANGS,
    build_tokenizer,
    demo_vocabulary,
    make_questions,
    make_texts,
    make_training_documents,
    write_questions,
    write_texts,
)
from moetrace.errors import MoetraceError
from moetrace.evaluate import LETTERS, format_prompt, letter_token_ids, load_questions, load_texts

# Independent reference tables (written out here, not imported from the generator).
DAYS = {
    "en": "monday tuesday wednesday thursday friday saturday sunday".split(),
    "de": "montag dienstag mittwoch donnerstag freitag samstag sonntag".split(),
}
MONTHS = {
    "en": "january february march april may june july august september october november december".split(),
    "de": "januar februar maerz april mai juni juli august september oktober november dezember".split(),
}
NUMBER_WORDS = {
    "en": "one two three four five six seven eight nine ten eleven twelve".split(),
    "de": "eins zwei drei vier fuenf sechs sieben acht neun zehn elf zwoelf".split(),
}
ARITH = re.compile(r"^(compute|rechne) (\d+) (plus|und|minus|weniger) (\d+) (equals|ergibt) \?$")
CODE = re.compile(r"^(print|drucke) \( (inc|dec|double|erhoehe|senke|verdopple) \( (0x[0-9a-f]+) \) \) -> \?$")
CODE2 = re.compile(r"^(print|drucke) \( (max|min|groesste|kleinste) \( (0x[0-9a-f]+) , (0x[0-9a-f]+) \) \) -> \?$")
FACT = re.compile(r"^(\w+) (lives in|wohnt in|works as|arbeitet als) \?$")
DATE_NUMBER = re.compile(r"^(\w+) (is|ist) (day|month|tag|monat) \?$")
DATE_NAME = re.compile(r"^(day|month|tag|monat) (\w+) (is|ist) \?$")
DATE_NEXT = re.compile(r"^(?:(\w+) )?(day|month|tag|monat|days|months|tage|monate) (after|before|nach|vor) (\w+) (is|ist)"
                       r"( day| month| tag| monat)? \?$")
FACT_STATEMENT = re.compile(r"(\w+) (lives in|wohnt in|works as|arbeitet als) (\w+)")


def _facts_from_corpus(seed: int) -> dict[tuple[str, str], str]:
    """(person, relation phrase) -> object, read off the plain-text statements the model trains on."""
    facts: dict[tuple[str, str], set] = {}
    # 64 people x 2 relations: 6400 documents state each fact ~19 times per language, so none is missing
    docs = make_training_documents(6400, seed=seed, mc_fraction=0.0) + make_texts(30, seed=seed)
    for doc in docs:
        if doc["domain"] == "facts":
            for person, rel, obj in FACT_STATEMENT.findall(doc["text"]):
                facts.setdefault((person, rel), set()).add(obj)
    assert all(len(v) == 1 for v in facts.values()), "a person has two cities or jobs in the corpus"
    return {k: next(iter(v)) for k, v in facts.items()}


def _derive(q: dict, facts: dict) -> str:
    """The correct answer of a demo question, computed from its text alone."""
    text, lang = q["question"], q["lang"]
    if q["domain"] == "arith":
        _, a, op, b, _ = ARITH.match(text).groups()
        return str(int(a) + int(b) if op in ("plus", "und") else int(a) - int(b))
    if q["domain"] == "code":
        if CODE2.match(text):
            _, op, a, b = CODE2.match(text).groups()
            a, b = int(a, 16), int(b, 16)
            return hex(max(a, b) if op in ("max", "groesste") else min(a, b))
        _, op, x = CODE.match(text).groups()
        x = int(x, 16)
        results = {"inc": x + 1, "erhoehe": x + 1, "dec": x - 1, "senke": x - 1, "double": 2 * x, "verdopple": 2 * x}
        return hex(results[op])
    if q["domain"] == "facts":
        person, rel = FACT.match(text).groups()
        return facts[(person, rel)]
    if DATE_NUMBER.match(text):
        name, _, unit = DATE_NUMBER.match(text).groups()
        names = MONTHS[lang] if unit in ("month", "monat") else DAYS[lang]
        return NUMBER_WORDS[lang][names.index(name)]
    if DATE_NAME.match(text):
        unit, number, _ = DATE_NAME.match(text).groups()
        names = MONTHS[lang] if unit in ("month", "monat") else DAYS[lang]
        return names[NUMBER_WORDS[lang].index(number)]
    count, unit, direction, start, _, as_number = DATE_NEXT.match(text).groups()
    k = 1 if count is None else NUMBER_WORDS[lang].index(count) + 1
    assert (k == 1) == (unit in ("day", "month", "tag", "monat")), text  # "day after", "two days after"
    names = MONTHS[lang] if unit in ("month", "monat", "months", "monate") else DAYS[lang]
    i = (names.index(start) + (k if direction in ("after", "nach") else -k)) % len(names)
    return NUMBER_WORDS[lang][i] if as_number else names[i]


def _check_questions(questions, seed):
    facts = _facts_from_corpus(seed)
    for q in questions:
        choices = [q[c] for c in LETTERS]
        assert len(set(choices)) == 4, q
        assert q["answer"] in LETTERS
        assert q[q["answer"]] == _derive(q, facts), q


def test_questions_balanced_and_answers_correct():
    qs = make_questions(30, seed=0)
    assert len(qs) == 30 * len(DOMAINS) * len(LANGS)
    groups = [(q["domain"], q["lang"]) for q in qs]
    assert {g: groups.count(g) for g in set(groups)} == {(d, lang): 30 for d in DOMAINS for lang in LANGS}
    assert len({format_prompt(q) for q in qs}) == len(qs)
    _check_questions(qs, seed=0)
    # answer letters are spread over A-D (not always the same position)
    letters = [q["answer"] for q in qs]
    assert all(letters.count(x) > len(qs) / 10 for x in LETTERS)


def test_choices_are_the_aligned_block_holding_the_answer():
    qs = make_questions(30, seed=0)
    block_of = {}
    for q in qs:
        choices = [q[c] for c in LETTERS]
        if q["domain"] == "facts":
            assert q["A"] in ("velm", "miral", "baker", "painter", "baecker", "maler")  # blocks of 4
        elif q["domain"] in ("arith", "code"):
            nums = [int(c, 16 if q["domain"] == "code" else 10) for c in choices]
            assert nums == list(range(nums[0], nums[0] + 4)) and (nums[0] % 4 == 0 or nums[-1] == 18)
        else:  # dates: number words 1-4, 5-8, 9-12, or a block of 4 month / weekday names (cyclic)
            space = next(names[q["lang"]] for names in (NUMBER_WORDS, MONTHS, DAYS) if choices[0] in names[q["lang"]])
            start = space.index(choices[0])
            assert start % 4 == 0 and choices == [space[(start + j) % len(space)] for j in range(4)]
        # the same answer always comes with the same choices (the letter follows from the answer)
        key = (q["domain"], q["lang"], q[q["answer"]])
        assert block_of.setdefault(key, choices) == choices


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_questions_correct_for_any_seed(seed):
    _check_questions(make_questions(4, seed=seed), seed)


def test_surface_languages_differ():
    qs = make_questions(10, seed=0)
    for d in DOMAINS:
        en = {w for q in qs if q["domain"] == d and q["lang"] == "en" for w in q["question"].split()}
        de = {w for q in qs if q["domain"] == d and q["lang"] == "de" for w in q["question"].split()}
        assert en - de and de - en, d


def test_generation_is_deterministic():
    assert make_questions(5, seed=7) == make_questions(5, seed=7)
    assert make_questions(5, seed=7) != make_questions(5, seed=8)
    assert make_texts(3, seed=7) == make_texts(3, seed=7)
    qs = make_questions(5, seed=7)
    assert make_training_documents(50, seed=7, exclude=qs) == make_training_documents(50, seed=7, exclude=qs)


def test_training_documents_exclude_eval_prompts_and_teach_the_format():
    qs = make_questions(20, seed=0)
    docs = make_training_documents(1600, seed=0, exclude=qs)
    eval_prompts = {format_prompt(q) for q in qs}
    mc = [d for d in docs if d["kind"] == "mc"]
    assert len(mc) == 800
    for d in mc:
        prompt, letter = d["text"].rsplit(" ", 1)
        assert letter in LETTERS and prompt.endswith("Answer:")
        assert prompt not in eval_prompts
    assert {(d["domain"], d["lang"]) for d in docs} == {(d, lang) for d in DOMAINS for lang in LANGS}


def test_tokenizer_round_trip_and_no_unknown_words(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer()
    assert len(tok) == len(demo_vocabulary())
    docs = make_training_documents(400, seed=1) + make_texts(5, seed=1)
    ids = tok([d["text"] for d in docs])["input_ids"]
    assert all(row[0] == tok.bos_token_id for row in ids)
    assert tok.unk_token_id not in {t for row in ids for t in row}
    for d, row in zip(docs, ids):
        if d.get("kind", "text") == "text":  # statements are already one space between tokens
            assert tok.decode(row, skip_special_tokens=True) == d["text"]
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(docs[0]["text"])["input_ids"] == ids[0]
    assert loaded.pad_token_id == tok.pad_token_id == 0
    assert list(letter_token_ids(loaded)) == tok.convert_tokens_to_ids(list(LETTERS))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_question_writers_round_trip(tmp_path, suffix):
    qs = make_questions(3, seed=2)
    path = write_questions(tmp_path / f"q{suffix}", qs)
    assert load_questions(path) == qs


def test_text_writer_round_trip(tmp_path):
    texts = make_texts(2, seed=2)
    assert load_texts(write_texts(tmp_path / "t.jsonl", texts)) == texts


def test_bad_arguments():
    with pytest.raises(MoetraceError, match="n_per_group"):
        make_questions(0)
    with pytest.raises(MoetraceError, match="mc_fraction"):
        make_training_documents(10, mc_fraction=2.0)
    with pytest.raises(MoetraceError, match="suffix"):
        write_questions("/tmp/questions.txt", make_questions(1))


def test_tiny_build_is_deterministic_cached_and_loads_like_any_checkpoint(tmp_path):
    from moetrace.demo.model import BUILD_INFO, DemoConfig, build_demo_model, ensure_demo_model, load_demo_model

    cfg = DemoConfig(n_layers=2, n_experts=4, hidden=32, intermediate=32, n_heads=2, steps=4, batch_size=8,
                     n_questions=2, n_texts=2)
    a = build_demo_model(tmp_path / "a", config=cfg, progress=False)
    b = build_demo_model(tmp_path / "b", config=cfg, progress=False)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    with pytest.raises(MoetraceError, match=BUILD_INFO):
        build_demo_model(a, config=cfg, progress=False)
    model, tok = load_demo_model(a)
    assert type(model).__name__ == "OlmoeForCausalLM" and model.config.num_experts == 4
    assert tok("day after monday")["input_ids"] == build_tokenizer()("day after monday")["input_ids"]
    cached = ensure_demo_model(tmp_path / "cache", config=cfg, progress=False)
    assert cached.name == f"demo-{cfg.key()}"
    stamp = (cached / BUILD_INFO).stat().st_mtime_ns
    assert ensure_demo_model(tmp_path / "cache", config=cfg, progress=False) == cached
    assert (cached / BUILD_INFO).stat().st_mtime_ns == stamp
    assert DemoConfig(seed=1).key() != DemoConfig().key()


def test_build_records_its_platform_and_hash_and_ignores_the_callers_thread_count(tmp_path):
    import json

    import torch

    from moetrace.demo.model import BUILD_INFO, TRAIN_THREADS, DemoConfig, build_demo_model, platform_key, weights_sha256

    cfg = DemoConfig(n_layers=2, n_experts=4, hidden=32, intermediate=32, n_heads=2, steps=6, batch_size=8,
                     n_questions=2, n_texts=2)
    threads = torch.get_num_threads()
    built = {}
    for n in (1, 3):
        torch.set_num_threads(n)
        try:
            built[n] = build_demo_model(tmp_path / str(n), config=cfg, progress=False)
            assert torch.get_num_threads() == n  # restored after training
        finally:
            torch.set_num_threads(threads)
    assert weights_sha256(built[1]) == weights_sha256(built[3])
    info = json.loads((built[1] / BUILD_INFO).read_text())
    assert info["weights_sha256"] == weights_sha256(built[1])
    assert info["platform"] == platform_key() and info["torch_threads"] == TRAIN_THREADS
    assert platform_key().endswith(f"-torch{torch.__version__}")
