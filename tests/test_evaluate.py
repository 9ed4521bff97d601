"""moetrace.evaluate against plain per-question forward passes and hand-computed values."""

from __future__ import annotations

import contextlib
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moetrace.demo.data import build_tokenizer
from moetrace.errors import MoetraceError
from moetrace.evaluate import (
    LETTERS,
    format_prompt,
    letter_token_ids,
    load_questions,
    load_texts,
    multiple_choice_accuracy,
    perplexity,
)

# Hand-made questions of different lengths (so batches need padding), three groups.
QUESTIONS = [
    {"question": "compute 1 plus 2 equals ?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "A",
     "domain": "arith", "lang": "en"},
    {"question": "rechne 9 weniger 4 ergibt ?", "A": "3", "B": "5", "C": "1", "D": "0", "answer": "B",
     "domain": "arith", "lang": "de"},
    {"question": "compute 7 minus 7 equals ?", "A": "2", "B": "14", "C": "0", "D": "1", "answer": "C",
     "domain": "arith", "lang": "en"},
    {"question": "print ( double ( 3 ) ) -> ?", "A": "3", "B": "8", "C": "1", "D": "6", "answer": "D",
     "domain": "code", "lang": "en"},
    {"question": "drucke ( senke ( 4 ) ) -> ?", "A": "4", "B": "0", "C": "9", "D": "2", "answer": "A",
     "domain": "code", "lang": "de"},
    {"question": "mara lives in ?", "A": "velm", "B": "ostra", "C": "zarak", "D": "miral", "answer": "B",
     "domain": "code", "lang": "en"},
    {"question": "day after monday is ?", "A": "friday", "B": "sunday", "C": "tuesday", "D": "wednesday",
     "answer": "D", "domain": "arith", "lang": "de"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    cfg = OlmoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      initializer_range=0.5, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return OlmoeForCausalLM(cfg).eval()


def _manual_last_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    """Logits at the prompt's last token from one plain, unbatched, unpadded forward pass."""
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1].float()


def _expected(model, tokenizer, prompts):
    letter_ids = letter_token_ids(tokenizer)
    last = torch.stack([_manual_last_logits(model, tokenizer, p) for p in prompts])
    letter_logits = last[:, letter_ids].numpy()
    return letter_logits, np.asarray(LETTERS)[letter_logits.argmax(1)], last.argmax(1).numpy()


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_accuracy_equals_per_question_forward(model, tokenizer, batch_size):
    logits, predicted, output_ids = _expected(model, tokenizer, [format_prompt(q) for q in QUESTIONS])
    res = multiple_choice_accuracy(model, tokenizer, QUESTIONS, scoring="letter", batch_size=batch_size, progress=False)
    t = res.table
    np.testing.assert_allclose(t["letter_logits"], logits, atol=1e-4, rtol=1e-4)
    margins = np.sort(logits, axis=1)[:, -1] - np.sort(logits, axis=1)[:, -2]
    assert margins.min() > 1e-3  # the random model's choices are not near ties, so they must match
    assert t["predicted"].tolist() == predicted.tolist()
    assert t["output_token_id"].tolist() == output_ids.tolist()
    assert t["output_token"].tolist() == [tokenizer.decode([int(i)]) for i in output_ids]
    answers = [q["answer"] for q in QUESTIONS]
    assert t["correct"].tolist() == [p == a for p, a in zip(predicted, answers)]
    assert t["q"].tolist() == list(range(len(QUESTIONS)))
    # per-group accuracy by hand
    expected = {}
    for q, p in zip(QUESTIONS, predicted):
        n, c = expected.get((q["domain"], q["lang"]), (0, 0))
        expected[(q["domain"], q["lang"])] = (n + 1, c + (p == q["answer"]))
    assert res.by_group() == pytest.approx({k: c / n for k, (n, c) in expected.items()})
    assert res.groups["n"].tolist() == [expected[k][0] for k in sorted(expected)]
    assert res.accuracy == pytest.approx(np.mean(t["correct"]))


def test_k_shot_prompts_use_following_questions_of_the_same_domain(model, tokenizer):
    domains = [q["domain"] for q in QUESTIONS]
    prompts = []
    for i, q in enumerate(QUESTIONS):
        same = [j for j, d in enumerate(domains) if d == q["domain"]]
        r = same.index(i)
        shots = [QUESTIONS[same[(r + 1) % len(same)]], QUESTIONS[same[(r + 2) % len(same)]]]
        prompts.append(format_prompt(q, shots))
    logits, predicted, _ = _expected(model, tokenizer, prompts)
    res = multiple_choice_accuracy(model, tokenizer, QUESTIONS, scoring="letter", k_shot=2, batch_size=4, progress=False)
    np.testing.assert_allclose(res.table["letter_logits"], logits, atol=1e-4, rtol=1e-4)
    assert res.table["predicted"].tolist() == predicted.tolist()
    with pytest.raises(MoetraceError, match="k_shot"):
        multiple_choice_accuracy(model, tokenizer, QUESTIONS, scoring="letter", k_shot=3, progress=False)
    res = multiple_choice_accuracy(model, tokenizer, QUESTIONS[:2], scoring="letter", k_shot=1, shots=QUESTIONS[2:],
                                   progress=False)
    logits, _, _ = _expected(model, tokenizer, [format_prompt(QUESTIONS[0], [QUESTIONS[2]]),
                                                format_prompt(QUESTIONS[1], [QUESTIONS[2]])])
    np.testing.assert_allclose(res.table["letter_logits"], logits, atol=1e-4, rtol=1e-4)


class LengthLM(torch.nn.Module):
    """A fake causal LM whose last-token logits put 1.0 on letter ``(real tokens) % 4``, 0 elsewhere.

    It also checks that every real token got position ids 0..n-1.
    """

    def __init__(self, vocab_size: int, letter_ids):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.letter_ids = vocab_size, torch.as_tensor(letter_ids)

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep, use_cache):
        n = attention_mask.sum(dim=1)
        for b in range(len(n)):
            assert position_ids[b][attention_mask[b] == 1].tolist() == list(range(int(n[b])))
        logits = torch.zeros(len(n), 1, self.vocab_size)
        logits[torch.arange(len(n)), 0, self.letter_ids[n % 4]] = 1.0
        return SimpleNamespace(logits=logits)


def test_accuracy_hand_computed_with_fake_model(tokenizer):
    fake = LengthLM(len(tokenizer), letter_token_ids(tokenizer))
    # token count by hand: [BOS] + word runs + punctuation runs of the prompt
    counts = [1 + len(re.findall(r"\w+|[^\w\s]+", format_prompt(q))) for q in QUESTIONS]
    predicted = [LETTERS[c % 4] for c in counts]
    res = multiple_choice_accuracy(fake, tokenizer, QUESTIONS, scoring="letter", batch_size=4, progress=False,
                                   by=("domain",))
    assert res.table["predicted"].tolist() == predicted
    assert res.table["output_token"].tolist() == predicted
    correct = [p == q["answer"] for p, q in zip(predicted, QUESTIONS)]
    assert res.table["correct"].tolist() == correct
    arith = [c for c, q in zip(correct, QUESTIONS) if q["domain"] == "arith"]
    code = [c for c, q in zip(correct, QUESTIONS) if q["domain"] == "code"]
    assert res.by_group() == pytest.approx({("arith",): np.mean(arith), ("code",): np.mean(code)})
    assert 0 < res.accuracy < 1  # the hand-made set gets some right and some wrong


def test_capture_fn_gets_every_question_once_with_its_labels(model, tokenizer):
    calls = []

    class FakeCapture:
        def set_batch(self, seq, labels):
            calls.append((np.asarray(seq), {k: np.asarray(v) for k, v in labels.items()}))

    @contextlib.contextmanager
    def capture_fn(m, store, labels):
        assert m is model and store is None and labels == ["domain", "lang"]
        yield FakeCapture()

    multiple_choice_accuracy(model, tokenizer, QUESTIONS, scoring="letter", batch_size=3, progress=False,
                             capture_fn=capture_fn)
    assert len(calls) == 3
    seqs = np.concatenate([c[0] for c in calls])
    assert sorted(seqs.tolist()) == list(range(len(QUESTIONS)))
    for seq, labels in calls:
        assert labels["domain"].tolist() == [QUESTIONS[i]["domain"] for i in seq]
        assert labels["lang"].tolist() == [QUESTIONS[i]["lang"] for i in seq]


def test_capture_into_store_records_every_prompt_token_once(model, tokenizer, tmp_path):
    from moetrace.store import TraceStore

    path = tmp_path / "trace.zarr"
    res = multiple_choice_accuracy(model, tokenizer, QUESTIONS, scoring="letter", batch_size=3, progress=False,
                                   store=path)
    st = TraceStore.open(path)
    rows = st.read(["seq", "pos", "token_id", "domain", "lang"], 0, len(st))
    order = np.lexsort((rows["pos"], rows["seq"]))
    for i, q in enumerate(QUESTIONS):
        mine = order[rows["seq"][order] == i]
        ids = tokenizer(format_prompt(q))["input_ids"]
        assert rows["token_id"][mine].tolist() == ids
        assert rows["pos"][mine].tolist() == list(range(len(ids)))
        assert {st.labels["domain"][c] for c in rows["domain"][mine]} == {q["domain"]}
        assert {st.labels["lang"][c] for c in rows["lang"][mine]} == {q["lang"]}
    assert len(st) == sum(len(tokenizer(format_prompt(q))["input_ids"]) for q in QUESTIONS)
    seqs = st.read_sequences()
    back = np.argsort(seqs["seq"])
    assert seqs["seq"][back].tolist() == list(range(len(QUESTIONS)))
    assert seqs["correct"][back].tolist() == res.table["correct"].tolist()
    assert seqs["answer_char"][back].tolist() == [q["answer"] for q in QUESTIONS]
    assert seqs["output_token"][back].tolist() == res.table["output_token"].tolist()


def test_perplexity_equals_per_text_loss(model, tokenizer):
    texts = [
        {"text": "compute 1 plus 2 equals 3 .", "domain": "arith", "lang": "en"},
        {"text": "rechne 9 weniger 4 ergibt 5 . rechne 1 und 1 ergibt 2 .", "domain": "arith", "lang": "de"},
        {"text": "print ( inc ( 12 ) ) -> 13", "domain": "code", "lang": "en"},
        {"text": "mara", "domain": "code", "lang": "en"},
        {"text": "compute 3 minus 1 equals 2 . compute 4 plus 4 equals 8 .", "domain": "arith", "lang": "en"},
    ]
    losses, counts = [], []
    for t in texts:
        ids = torch.tensor([tokenizer(t["text"])["input_ids"]])
        with torch.no_grad():
            losses.append(float(model(input_ids=ids, labels=ids).loss))  # transformers' own shift + mean
        counts.append(ids.shape[1] - 1)
    res = perplexity(model, tokenizer, texts, batch_size=2, progress=False)
    np.testing.assert_allclose(res.table["loss"], losses, rtol=1e-5, atol=1e-5)
    assert res.table["n_tokens"].tolist() == counts
    expected = {}
    for t, loss, n in zip(texts, losses, counts):
        s, c = expected.get((t["domain"], t["lang"]), (0.0, 0))
        expected[(t["domain"], t["lang"])] = (s + loss * n, c + n)
    assert res.by_group() == pytest.approx({k: s / c for k, (s, c) in expected.items()}, rel=1e-5)
    np.testing.assert_allclose(res.groups["perplexity"], np.exp(res.groups["loss"]))
    assert res.groups["n_texts"].tolist() == [1, 2, 2]  # (arith,de), (arith,en), (code,en)


def test_perplexity_rejects_one_token_texts(model, tokenizer):
    with pytest.raises(MoetraceError, match="text 0: expected at least 2 tokens"):
        perplexity(model, tokenizer, [{"text": "", "domain": "a", "lang": "b"}], progress=False)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_load_questions_csv_and_jsonl(tmp_path):
    csv_path = _write(tmp_path / "q.csv", "question,A,B,C,D,answer,subject\nwhat ?,1,2,3,4, C ,bio\n")
    assert load_questions(csv_path) == [{"question": "what ?", "A": "1", "B": "2", "C": "3", "D": "4",
                                         "answer": "C", "subject": "bio", "domain": "bio", "lang": "all"}]
    rows = [{"question": "q1", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A", "domain": "x", "lang": "de"}]
    jsonl = _write(tmp_path / "q.jsonl", "".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert load_questions(jsonl) == rows


@pytest.mark.parametrize("name, text, match", [
    ("missing.csv", "question,A,B,C,answer\nq,1,2,3,A\n", r"missing \['D'\]"),
    ("bad.csv", "question,A,B,C,D,answer\nq,1,2,3,4,A\nq,1,2,3,4,E\n", r"line 3: column 'answer'"),
    ("empty.csv", "question,A,B,C,D,answer\n ,1,2,3,4,A\n", r"line 2: column 'question'"),
    ("bad.jsonl", '{"question": "q", "A": 1, "B": 2, "C": 3, "D": 4, "answer": "A"}\n{oops\n', r"line 2"),
    ("short.jsonl", '{"question": "q", "A": 1, "B": 2, "C": 3, "D": 4, "answer": "A"}\n'
                    '{"question": "q", "A": 1, "B": 2, "C": 3, "answer": "A"}\n', r"line 2: column 'D'"),
    ("q.txt", "x", r"suffix '.txt'"),
    ("none.csv", "question,A,B,C,D,answer\n", r"at least one question"),
])
def test_load_questions_errors_name_file_row_column(tmp_path, name, text, match):
    path = _write(tmp_path / name, text)
    with pytest.raises(MoetraceError, match=match) as err:
        load_questions(path)
    assert str(path) in str(err.value)


def test_load_texts(tmp_path):
    path = _write(tmp_path / "t.jsonl", '{"text": "a b", "domain": "d"}\n')
    assert load_texts(path) == [{"text": "a b", "domain": "d", "lang": "all"}]
    bad = _write(tmp_path / "b.jsonl", '{"text": "a b"}\n{"txt": "a"}\n')
    with pytest.raises(MoetraceError, match="line 2: key 'text'"):
        load_texts(bad)


def test_letter_tokens_must_exist():
    class NoLetters:
        def encode(self, text, add_special_tokens=False):
            return [1]

        def decode(self, ids):
            return "[UNK]"

    with pytest.raises(MoetraceError, match="tokenizer: expected ' A'"):
        letter_token_ids(NoLetters())


def _option_logprob(model, tokenizer, context: str, option: str) -> float:
    """Summed log-probability of ``" " + option``'s tokens after ``context``: one plain, unbatched
    forward pass per option over the whole sequence."""
    ctx = tokenizer(context)["input_ids"]
    opt = tokenizer(" " + option, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + opt])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(opt)))


# Cloze questions (a context column) beside plain ones, with options of one and of several tokens.
ANSWER_QUESTIONS = [
    {**QUESTIONS[0], "context": "compute 1 plus 2 equals"},
    {**QUESTIONS[5], "context": "mara lives in"},
    {"question": "month after march is ?", "A": "april may", "B": "june", "C": "( july )", "D": "may",
     "answer": "A", "domain": "dates", "lang": "en", "context": "month after march is"},
    QUESTIONS[3],  # no context: "Question: ...\nAnswer:" is the context
    QUESTIONS[6],
]


@pytest.mark.parametrize("batch_size", [1, 2, 16])
@pytest.mark.parametrize("blind", [False, True])
def test_answer_scoring_equals_one_forward_per_option(model, tokenizer, batch_size, blind):
    from moetrace.evaluate import answer_context

    res = multiple_choice_accuracy(model, tokenizer, ANSWER_QUESTIONS, answer_blind=blind, batch_size=batch_size,
                                   progress=False)
    assert res.scoring == "answer"
    expected = np.asarray([[_option_logprob(model, tokenizer, answer_context(q, blind=blind), q[x]) for x in LETTERS]
                           for q in ANSWER_QUESTIONS])
    np.testing.assert_allclose(res.table["scores"], expected, atol=2e-4, rtol=1e-4)
    predicted = np.asarray(LETTERS)[expected.argmax(axis=1)]
    assert res.table["predicted"].tolist() == predicted.tolist()
    assert res.table["correct"].tolist() == [p == q["answer"] for p, q in zip(predicted, ANSWER_QUESTIONS)]


def test_answer_context_rules():
    from moetrace.evaluate import answer_context

    cloze = ANSWER_QUESTIONS[1]
    assert answer_context(cloze) == "mara lives in"
    assert answer_context(cloze, blind=True) == ""
    assert answer_context(QUESTIONS[3]) == f"Question: {QUESTIONS[3]['question']}\nAnswer:"
    assert answer_context(QUESTIONS[3], blind=True) == "Answer:"


def test_answer_scoring_refuses_what_only_letters_do(model, tokenizer):
    with pytest.raises(MoetraceError, match="scoring='answer' takes no k_shot"):
        multiple_choice_accuracy(model, tokenizer, QUESTIONS, k_shot=1, progress=False)
    with pytest.raises(MoetraceError, match="answer_blind"):
        multiple_choice_accuracy(model, tokenizer, QUESTIONS, scoring="letter", answer_blind=True, progress=False)
    with pytest.raises(MoetraceError, match="scoring: expected one of"):
        multiple_choice_accuracy(model, tokenizer, QUESTIONS, scoring="word", progress=False)


def test_loss_on_answer_tokens_apart_from_the_rest(model, tokenizer):
    """perplexity's answer/other split equals a per-token loop over one unpadded text at a time."""
    from moetrace.demo.data import make_texts

    texts = make_texts(2, seed=3, statements_per_text=2)
    res = perplexity(model, tokenizer, texts, batch_size=3, progress=False)
    for i, t in enumerate(texts):
        enc = tokenizer(t["text"], return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        answer, other = [], []
        for j in range(1, ids.shape[1]):
            start, end = enc["offset_mapping"][j]
            nll = -float(logp[j - 1, ids[0, j]])
            hit = any(start < b and end > a for a, b in t["answer_spans"])
            (answer if hit else other).append(nll)
        assert res.table["n_answer_tokens"][i] == len(answer) == len(t["answer_spans"])  # one token per answer here
        assert res.table["answer_loss"][i] == pytest.approx(np.mean(answer), abs=1e-4)
        assert res.table["other_loss"][i] == pytest.approx(np.mean(other), abs=1e-4)
        assert res.table["loss"][i] == pytest.approx(np.mean(answer + other), abs=1e-4)


def test_answer_spans_are_checked(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "mara lives in velm", "answer_spans": [[14, 18]]}) + "\n"
                    + json.dumps({"text": "abc", "answer_spans": [[2, 9]]}) + "\n")
    with pytest.raises(MoetraceError, match=r"line 2: key 'answer_spans': expected a list of \[start, end\]"):
        load_texts(path)
    path.write_text(json.dumps({"text": "mara lives in velm", "answer_spans": [[14, 18]]}) + "\n")
    assert load_texts(path)[0]["answer_spans"] == [[14, 18]]


@pytest.mark.slow
@pytest.mark.long  # 10 min: outside CI's slow subset (bench/RESULTS.md); `make test-slow` runs it
def test_demo_model_rebuilds_deterministically_here(tmp_path):
    """Training the default demo model twice on this machine gives the same bits, and the rebuilt
    model knows its domains as the shipped one does (answer-scored accuracy >= 0.8 in each).

    Its bits equal the shipped weights' only where float rounding matches the machine they were
    trained on, which ``platform_key`` (architecture, torch's SIMD level, torch version) does not
    pin down: two AVX-512 CPUs, one with AMX, gave different weights under the same key (issue 26).
    So this checks what holds on every machine; the shipped file's own hash is checked by
    test_shipped_demo_model_is_the_recorded_one_and_knows_its_domains.
    """
    from moetrace.demo.model import (QUESTIONS_FILE, SHIPPED_DIR, DemoConfig, build_demo_model, load_demo_model,
                                     shipped_build_info, weights_sha256)

    a = build_demo_model(tmp_path / "a", progress=False)
    b = build_demo_model(tmp_path / "b", progress=False)
    assert weights_sha256(a) == weights_sha256(b)
    assert shipped_build_info()["key"] == DemoConfig().key()
    model, tok = load_demo_model(a)
    questions = load_questions(SHIPPED_DIR / QUESTIONS_FILE)
    accuracy = multiple_choice_accuracy(model, tok, questions, by=("domain",), batch_size=256,
                                        progress=False).by_group()
    assert min(accuracy.values()) >= 0.8, accuracy


def test_shipped_demo_model_is_the_recorded_one_and_knows_its_domains():
    """The shipped checkpoint's weights hash equals demo_build.json's, every domain's answer-scored
    accuracy is >= 0.8 (the demo's requirement), and the accuracies recorded at build time are
    what the reloaded checkpoint gets here."""
    from moetrace.demo.model import (BUILD_INFO, QUESTIONS_FILE, SHIPPED_DIR, DemoConfig, check_shipped_model,
                                     ensure_demo_model, load_demo_model, weights_sha256)

    assert ensure_demo_model() == SHIPPED_DIR
    assert check_shipped_model() == weights_sha256(SHIPPED_DIR)
    info = json.loads((SHIPPED_DIR / BUILD_INFO).read_text())
    assert info["key"] == DemoConfig().key()
    assert (SHIPPED_DIR / "model.safetensors").stat().st_size < 20e6
    model, tok = load_demo_model(SHIPPED_DIR)
    questions = load_questions(SHIPPED_DIR / QUESTIONS_FILE)
    assert len(questions) == 800
    accuracy = {k[0]: v for k, v in multiple_choice_accuracy(model, tok, questions, by=("domain",), batch_size=256,
                                                              progress=False).by_group().items()}
    assert min(accuracy.values()) >= 0.8, accuracy
    assert accuracy == pytest.approx(info["accuracy"]["answer"], abs=0.011)  # a question may flip on another CPU


def test_a_damaged_shipped_model_is_refused(tmp_path, monkeypatch):
    import shutil

    from moetrace.demo import model as demo_model

    copy = tmp_path / "checkpoint"
    shutil.copytree(demo_model.SHIPPED_DIR, copy)
    with open(copy / "model.safetensors", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01")
    monkeypatch.setattr(demo_model, "SHIPPED_DIR", copy)
    with pytest.raises(MoetraceError, match="expected SHA-256 .* got .*the file is damaged"):
        demo_model.check_shipped_model()
