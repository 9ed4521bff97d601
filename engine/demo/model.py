"""The demo model: a small OLMoE (``transformers.OlmoeForCausalLM``) trained on the demo data.

The default demo model ships with moetrace: ``engine/demo/checkpoint/`` is an ordinary local
checkpoint (``model.safetensors``, config, tokenizer) with the demo's evaluation data
(``questions.jsonl``, ``texts.jsonl``, ``select_texts.jsonl``) and ``demo_build.json`` (the
build parameters, the platform it was trained on, the weights' SHA-256 and the accuracies it
measured). It was written by::

    python -c "from moetrace.demo.model import build_demo_model; build_demo_model('engine/demo/checkpoint')"

so every machine runs the demo on the same weights (training is not bit-reproducible across
CPU instruction sets, see below). ``build_demo_model`` trains it from a seed and saves the same
files; ``load_demo_model`` is just ``from_pretrained`` on a directory, the same code path as any
local checkpoint; ``ensure_demo_model`` returns the shipped checkpoint for the default build
parameters and otherwise builds once per set of parameters and reuses the cached directory;
``retrain_demo_model`` rebuilds the default and says whether its hash matches the shipped one.

Load balancing: the Switch-style auxiliary loss is kept, at a small coefficient (``aux_coef``
0.001; OLMoE itself uses 0.01). It asks only that every expert get about the same share of a
batch's tokens, not that any token spread over experts, so it is compatible with each domain
owning a few experts, and it keeps experts alive (a dead expert carries no domain); a larger
coefficient also pushes the router towards less decisive scores. Measured on an earlier version
of this data (2000 steps, top-1 counts over the evaluation prompts, "specialized" = an expert
whose share of a domain's tokens is at least twice the domain's share of all tokens): with 0.01
the specialized experts covered 6-19% of a domain's routing, with 0.001 15-29%.

Set-ups tried for the ablation experiment (``bench/RESULTS.md``, issues 15 and 19): top-2 and
top-1 routing, digits shared by three domains and a numeral system per domain, 1500 to 6000
steps, with and without the load-balancing loss. Scored by answer letter, no ablation moved any
domain's accuracy; scored by answer text (version 10, 4000 steps: every domain at 1.00), ablating
a domain's specialized experts costs it accuracy beyond matched random draws.

Determinism: the weights are a function of the build parameters (``DemoConfig``) through
``torch.manual_seed`` and a seeded data order, given the platform (:func:`platform_key`: the CPU
architecture, the SIMD kernels torch dispatches to, the torch version). Training always runs on
``TRAIN_THREADS`` (1) thread, so the machine's core count does not change the order of float
reductions; one thread also keeps training usable when other work shares the cores (measured on
this project's 2-core machine: 2 threads take 58 ms a step against 73 ms for one when the cores
are idle, but a 2-thread build with other jobs running was still unfinished after 25 minutes
when 1-thread builds beside it took 3.5: OpenMP's threads wait on each other). Another
instruction set (AVX2 vs AVX512) rounds some reductions differently, and training amplifies a
last-bit difference into another model, which is why the default model ships as a file and
``bench/RESULTS.md`` reports the experiment over several training seeds. ``demo_build.json``
records the platform key and the weights' SHA-256.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moetrace.demo.data import (
    build_tokenizer,
    make_questions,
    make_texts,
    make_training_documents,
    write_questions,
    write_texts,
)
from moetrace.errors import MoetraceError

BUILD_INFO = "demo_build.json"
TRAIN_THREADS = 1
QUESTIONS_FILE = "questions.jsonl"
QUESTIONS_CSV = "questions.csv"
TEXTS_FILE = "texts.jsonl"
SELECT_TEXTS_FILE = "select_texts.jsonl"
SHIPPED_DIR = Path(__file__).resolve().parent / "checkpoint"


@dataclass(frozen=True)
class DemoConfig:
    """Every parameter the demo model depends on (its hash keys the cache).

    Model: OLMoE with ``n_layers`` decoder layers, ``n_experts`` experts per layer, ``top_k``
    experts per token, hidden size ``hidden``, expert MLP size ``intermediate``, ``n_heads``
    attention heads. Training: ``steps`` AdamW steps of ``batch_size`` documents, peak learning
    rate ``lr`` (linear warm-up over ``warmup`` steps, cosine decay to 10%), router auxiliary
    loss coefficient ``aux_coef``, ``mc_fraction`` of the documents multiple-choice examples,
    whose answer-letter loss is weighted ``mc_weight`` against the text loss (``_loss``).
    Data: ``n_questions`` evaluation questions per (domain, lang) group, whose prompts (and so
    facts) never appear as training multiple-choice examples (their facts do appear as
    statements), ``n_texts`` perplexity texts of ``text_statements`` statements per group from
    an independent random stream (100 + 100 per group: 200 of each per domain), and as many
    selection texts from a third stream, none equal to an evaluated text, whose routing selects
    the ablation targets (held out from the evaluated items).
    ``version`` changes whenever the generator or the training changes what gets built.
    """

    seed: int = 0
    n_layers: int = 4
    n_experts: int = 16
    top_k: int = 2
    hidden: int = 64
    intermediate: int = 128
    n_heads: int = 4
    steps: int = 4000
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 50
    aux_coef: float = 0.001
    mc_fraction: float = 0.5
    mc_weight: float = 1.0
    n_questions: int = 100
    n_texts: int = 100
    text_statements: int = 2
    version: int = 10

    def key(self) -> str:
        """A short hash of every field: the cache directory name."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def platform_key() -> str:
    """What the demo model's bits depend on besides ``DemoConfig``: CPU architecture, the SIMD
    level torch's CPU kernels dispatch to, and the torch version (e.g. ``x86_64-AVX512-torch2.13.0``)."""
    return f"{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}-torch{torch.__version__}"


def weights_sha256(model_dir: str | Path) -> str:
    """SHA-256 hex digest of ``model_dir/model.safetensors``."""
    h = hashlib.sha256()
    with open(Path(model_dir) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_config(cfg: DemoConfig, tokenizer):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        num_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, max_position_embeddings=512,
        router_aux_loss_coef=cfg.aux_coef, output_router_logits=False, norm_topk_prob=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )


def _batches(ids: list[list[int]], is_mc: np.ndarray, batch_size: int, steps: int, seed: int, pad_id: int):
    """Yield ``steps`` (input_ids, attention_mask, labels int64 [B, T], is_mc bool [B]) batches, right padded.

    Epochs over the documents in a seeded permutation each. Labels are -100 on padding and, in
    multiple-choice documents, everywhere but the answer letter (their last token).
    """
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(ids))])
        rows, order = order[:batch_size], order[batch_size:]
        width = max(len(ids[i]) for i in rows)
        x = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        for j, i in enumerate(rows):
            x[j, : len(ids[i])] = torch.tensor(ids[i])
            if is_mc[i]:
                labels[j, len(ids[i]) - 1] = ids[i][-1]
            else:
                labels[j, : len(ids[i])] = x[j, : len(ids[i])]
        yield x, (x != pad_id).long(), labels, torch.from_numpy(is_mc[rows])


def _loss(logits: torch.Tensor, labels: torch.Tensor, is_mc: torch.Tensor, mc_weight: float) -> torch.Tensor:
    """Mean next-token loss over the text documents' tokens + ``mc_weight`` x mean loss of the
    multiple-choice answer letters (each part averaged on its own, so the one letter per
    multiple-choice document is not drowned by the many text tokens)."""
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=-100, reduction="none").view(labels.shape[0], -1)
    scored = (labels[:, 1:] != -100).float()
    text = ce[~is_mc].sum() / scored[~is_mc].sum().clamp(min=1)
    mc = ce[is_mc].sum() / scored[is_mc].sum().clamp(min=1)
    return text + mc_weight * mc


def build_demo_model(out_dir: str | Path, seed: int = 0, config: DemoConfig | None = None,
                     progress: bool = True) -> Path:
    """Train the demo model and save it to ``out_dir`` (created; must not hold a build already).

    Writes ``config.json`` + ``model.safetensors`` (``save_pretrained``), the tokenizer files,
    ``questions.jsonl`` / ``questions.csv`` (evaluation questions), ``texts.jsonl`` (perplexity
    texts), ``select_texts.jsonl`` (held-out texts for target selection) and ``demo_build.json``
    (the build parameters, platform, weights hash, training seconds, final loss and per domain
    the multiple-choice accuracy by answer scoring, by letter and answer-blind). ``seed`` is used
    when ``config`` is None. Returns ``out_dir`` as a Path.
    """
    from moetrace.evaluate import multiple_choice_accuracy

    cfg = config if config is not None else DemoConfig(seed=seed)
    out_dir = Path(out_dir)
    if (out_dir / BUILD_INFO).exists():
        raise MoetraceError(f"{out_dir}: expected a directory without a demo build, found {BUILD_INFO}")
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, cpu0 = time.perf_counter(), time.process_time()

    tokenizer = build_tokenizer()
    questions = make_questions(cfg.n_questions, seed=cfg.seed)
    texts = make_texts(cfg.n_texts, seed=cfg.seed, statements_per_text=cfg.text_statements)
    select_texts = make_texts(cfg.n_texts, seed=cfg.seed, statements_per_text=cfg.text_statements, stream="select",
                              exclude=texts)
    n_docs = cfg.steps * cfg.batch_size  # about one epoch: every document is seen once
    docs = make_training_documents(n_docs, seed=cfg.seed, mc_fraction=cfg.mc_fraction, exclude=questions)
    ids = tokenizer([d["text"] for d in docs], add_special_tokens=True)["input_ids"]
    is_mc = np.asarray([d["kind"] == "mc" for d in docs])

    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        model, losses = _train(cfg, tokenizer, ids, is_mc, progress)
    finally:
        torch.set_num_threads(threads)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_questions(out_dir / QUESTIONS_FILE, questions)
    write_questions(out_dir / QUESTIONS_CSV, questions)
    write_texts(out_dir / TEXTS_FILE, texts)
    write_texts(out_dir / SELECT_TEXTS_FILE, select_texts)

    def accuracy(**kwargs) -> dict[str, float]:
        result = multiple_choice_accuracy(model, tokenizer, questions, by=("domain",), batch_size=256,
                                          progress=False, **kwargs)
        return {k[0]: round(v, 4) for k, v in result.by_group().items()}

    info = {
        "config": dataclasses.asdict(cfg), "key": cfg.key(), "train_seconds": round(train_seconds, 2),
        "train_cpu_seconds": round(train_cpu_seconds, 2), "torch_threads": TRAIN_THREADS,
        "platform": platform_key(), "weights_sha256": weights_sha256(out_dir),
        "final_loss": float(np.mean(losses[-50:])),
        "accuracy": {"answer": accuracy(), "letter": accuracy(scoring="letter"),
                     "answer_blind": accuracy(answer_blind=True)},
    }
    (out_dir / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out_dir


def _train(cfg: DemoConfig, tokenizer, ids: list[list[int]], is_mc: np.ndarray, progress: bool):
    """The demo model trained on the tokenized documents; returns (model in eval mode, step losses)."""
    from transformers import OlmoeForCausalLM

    from moetrace.progress import tqdm

    torch.manual_seed(cfg.seed)
    model = OlmoeForCausalLM(_model_config(cfg, tokenizer))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses = []
    bar = tqdm(_batches(ids, is_mc, cfg.batch_size, cfg.steps, cfg.seed, tokenizer.pad_token_id),
               total=cfg.steps, desc="training demo model", disable=not progress)
    for x, mask, labels, mc in bar:
        out = model(input_ids=x, attention_mask=mask, output_router_logits=True, use_cache=False)
        loss = _loss(out.logits, labels, mc, cfg.mc_weight) + cfg.aux_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    model.eval()
    return model, losses


def load_demo_model(path: str | Path):
    """(model, tokenizer) from a local checkpoint directory, e.g. one ``build_demo_model`` wrote.

    Exactly ``AutoModelForCausalLM.from_pretrained(path)`` and ``AutoTokenizer.from_pretrained(path)``;
    the model is returned in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise MoetraceError(f"{path}: expected a model directory with config.json, found none")
    from moetrace.progress import transformers_bars

    with transformers_bars():
        model = AutoModelForCausalLM.from_pretrained(path)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def default_cache_dir() -> Path:
    """``$MOETRACE_CACHE`` if set, else ``~/.cache/moetrace``."""
    return Path(os.environ.get("MOETRACE_CACHE") or Path.home() / ".cache" / "moetrace")


def ensure_demo_model(cache_dir: str | Path | None = None, seed: int = 0, config: DemoConfig | None = None,
                      progress: bool = True) -> Path:
    """The directory of the demo model for these build parameters, building it on first use.

    The default parameters (``DemoConfig()``) return the shipped checkpoint :data:`SHIPPED_DIR`
    (its ``demo_build.json`` records the same key) unless ``cache_dir`` is given. Otherwise the
    directory is ``cache_dir / f"demo-{config.key()}"`` (``cache_dir`` defaults to
    :func:`default_cache_dir`). A build goes to a temporary sibling directory that is renamed
    into place when complete, so an interrupted build is never mistaken for a cached one.
    """
    cfg = config if config is not None else DemoConfig(seed=seed)
    if cache_dir is None and (SHIPPED_DIR / BUILD_INFO).is_file() and \
            json.loads((SHIPPED_DIR / BUILD_INFO).read_text()).get("key") == cfg.key():
        return SHIPPED_DIR
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"demo-{cfg.key()}"
    if (target / BUILD_INFO).is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".demo-{cfg.key()}-", dir=cache_dir))
    try:
        build_demo_model(tmp, config=cfg, progress=progress)
        if (target / BUILD_INFO).is_file():  # another process finished first
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def shipped_build_info() -> dict:
    """``demo_build.json`` of the shipped checkpoint."""
    path = SHIPPED_DIR / BUILD_INFO
    if not path.is_file():
        raise MoetraceError(f"{SHIPPED_DIR}: expected the shipped demo checkpoint with {BUILD_INFO}, found none; "
                            "reinstall moetrace or run `moetrace demo --retrain`")
    return json.loads(path.read_text())


def check_shipped_model() -> str:
    """The shipped weights' SHA-256, after checking it equals the one ``demo_build.json`` records
    (raises MoetraceError naming both when the file was changed or truncated)."""
    want = shipped_build_info()["weights_sha256"]
    got = weights_sha256(SHIPPED_DIR)
    if got != want:
        raise MoetraceError(f"{SHIPPED_DIR / 'model.safetensors'}: expected SHA-256 {want} (demo_build.json), "
                            f"got {got}; the file is damaged: restore it from git or run `moetrace demo --retrain`")
    return got


def retrain_demo_model(cache_dir: str | Path | None = None, progress: bool = True) -> tuple[Path, bool]:
    """Rebuild the default demo model in the cache (``ensure_demo_model`` with an explicit cache
    directory) and return (its directory, whether its weights' hash equals the shipped one's).
    A mismatch on another CPU instruction set is expected (module docstring)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = ensure_demo_model(cache, progress=progress)
    return path, weights_sha256(path) == shipped_build_info()["weights_sha256"]
