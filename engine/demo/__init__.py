"""The built-in demo: synthetic multi-domain, multi-language data and a small trained MoE model.

``moetrace.demo.data`` generates the text, the multiple-choice questions and the tokenizer;
``moetrace.demo.model`` trains a small OLMoE model on them, saves it as an ordinary local
checkpoint and caches it.
"""

from moetrace.demo.data import (
    DOMAINS,
    LANGS,
    build_tokenizer,
    make_questions,
    make_texts,
    make_training_documents,
)
from moetrace.demo.model import DemoConfig, build_demo_model, ensure_demo_model, load_demo_model

__all__ = [
    "DOMAINS",
    "LANGS",
    "DemoConfig",
    "build_demo_model",
    "build_tokenizer",
    "ensure_demo_model",
    "load_demo_model",
    "make_questions",
    "make_texts",
    "make_training_documents",
]
