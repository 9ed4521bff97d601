"""Test oracle: a straightforward pandas transcription of the seed 000 R notebook.

Each function follows one cell of the notebook, dplyr verb by dplyr verb, on the notebook's
two tables:
  - samples: one row per generated token: q_ix, token_ix, token, domain, lang,
    question_output_token, answer_char;
  - topks: one row per token x layer x top-k rank: q_ix, token_ix, layer_ix, topk_ix
    (1-based, 1 = top choice), expert.
It is deliberately slow and literal (no counts tensors) so that moetrace.metrics can be checked
against it. One liberty: R orders the rules inside a layer of the exported JSON by how dplyr
sorts a list column; here they are sorted by (prefix, target). The JSON object is the same.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def load(raw_sample_df: pd.DataFrame, raw_topk_df: pd.DataFrame) -> dict:
    """The notebook's "Load data" cell: drop the token prefix shared by every question.

    Returns {"sample_df", "topk_df", "topk1_df", "last_shared_tok"}.
    """
    raw = raw_sample_df.sort_values(["q_ix", "token_ix"], kind="stable").reset_index(drop=True)
    raw["shifted_token_ix"] = raw.groupby("q_ix").cumcount() + 1
    per_pos_tok = raw.groupby(["shifted_token_ix", "token"]).size().reset_index(name="n_questions_with_token_ix_tok")
    n_questions = raw["q_ix"].nunique()
    shared = per_pos_tok.loc[per_pos_tok["n_questions_with_token_ix_tok"] == n_questions, "shifted_token_ix"]
    last_shared_tok = shared.max() if len(shared) else -np.inf  # R: max(integer(0)) is -Inf
    sample_df = raw[raw["shifted_token_ix"] > last_shared_tok].reset_index(drop=True)
    topk_df = raw_topk_df.merge(sample_df[["q_ix", "token_ix"]], on=["q_ix", "token_ix"], how="inner")
    topk1_df = topk_df[topk_df["topk_ix"] == 1].drop(columns="topk_ix").reset_index(drop=True)
    return {"sample_df": sample_df, "topk_df": topk_df, "topk1_df": topk1_df, "last_shared_tok": last_shared_tok}


def base_accs(sample_df: pd.DataFrame) -> pd.DataFrame:
    """The ``base_accs`` cell: per (domain, lang) base_acc, questions, total_tokens."""
    per_q = (
        sample_df.groupby(["domain", "lang", "q_ix", "question_output_token", "answer_char"])
        .size()
        .reset_index(name="tokens_per_question")
    )
    squished = per_q["question_output_token"].map(lambda s: " ".join(str(s).split()))
    per_q["is_correct"] = np.where(squished == per_q["answer_char"], 1, 0)
    out = per_q.groupby(["domain", "lang"]).agg(
        correct=("is_correct", "sum"), questions=("q_ix", "size"), total_tokens=("tokens_per_question", "sum")
    )
    out["base_acc"] = out["correct"] / out["questions"]
    return out.reset_index()[["domain", "lang", "base_acc", "questions", "total_tokens"]]


def _labels(sample_df: pd.DataFrame) -> pd.DataFrame:
    return sample_df[["q_ix", "token_ix", "domain", "lang"]]


def _select(dom_x: pd.DataFrame, item_cols: list[str], test_domain: str, test_lang: str, threshold: float):
    """The shared ``spec_*`` pattern: share of each item's samples from the group vs the group's share."""
    dom_counts = dom_x.groupby(["domain", "lang"], as_index=False)["n_samples"].sum()
    dom_counts = dom_counts.rename(columns={"n_samples": "n_tok_samples"})
    dom_counts["n_tok_prop"] = dom_counts["n_tok_samples"] / dom_counts["n_tok_samples"].sum()

    spec = dom_x.copy()
    spec["prop_of_samples"] = spec["n_samples"] / spec.groupby(item_cols)["n_samples"].transform("sum")
    spec = spec[(spec["domain"] == test_domain) & (spec["lang"] == test_lang)]
    spec = spec.merge(dom_counts, on=["domain", "lang"], how="left")
    spec = spec[spec["prop_of_samples"] >= spec["n_tok_prop"] * threshold]
    group_total = int(dom_x.loc[(dom_x["domain"] == test_domain) & (dom_x["lang"] == test_lang), "n_samples"].sum())
    return spec.sort_values(item_cols, kind="stable").reset_index(drop=True), dom_counts, group_total


def spec_paths(data: dict, test_domain: str, test_lang: str, threshold: float = 1.0):
    """Ablation method 1: layer-to-layer top-1 paths (``slide(.before = 1)``, ``layer_ix > 0``).

    Returns (spec table with prev_layer, layer_ix, prev_expert, expert, n_samples, ...,
    dom_tok_counts, the group's total path samples).
    """
    t = data["topk1_df"][["layer_ix", "q_ix", "token_ix", "expert"]]
    t = t.sort_values(["q_ix", "token_ix", "layer_ix"], kind="stable").reset_index(drop=True)
    same_token = (t["q_ix"] == t["q_ix"].shift(1)) & (t["token_ix"] == t["token_ix"].shift(1))
    t["prev_expert"] = t["expert"].shift(1).where(same_token)
    t["prev_layer"] = t["layer_ix"].shift(1).where(same_token)
    toks_with_paths = t[t["layer_ix"] > 0].merge(_labels(data["sample_df"]), on=["q_ix", "token_ix"], how="left")
    # every kept row has a predecessor when layer ids start at 0, as in the notebook's data
    assert toks_with_paths["prev_expert"].notna().all()
    toks_with_paths = toks_with_paths.astype({"prev_expert": np.int64, "prev_layer": np.int64})
    item_cols = ["prev_layer", "layer_ix", "prev_expert", "expert"]
    dom_x_path = toks_with_paths.groupby(["domain", "lang", *item_cols]).size().reset_index(name="n_samples")
    return _select(dom_x_path, item_cols, test_domain, test_lang, threshold)


def spec_experts(data: dict, test_domain: str, test_lang: str, threshold: float = 5.0):
    """Ablation method 2: top-1 expert per layer, ``layer_ix > 0``."""
    t = data["topk1_df"]
    t = t[t["layer_ix"] > 0].merge(_labels(data["sample_df"]), on=["q_ix", "token_ix"], how="left")
    item_cols = ["layer_ix", "expert"]
    dom_x = t.groupby(["domain", "lang", *item_cols]).size().reset_index(name="n_samples")
    return _select(dom_x, item_cols, test_domain, test_lang, threshold)


def spec_multi_topk(data: dict, test_domain: str, test_lang: str, threshold: float = 5.0):
    """Ablation method 3: ordered (topk_ix 1, topk_ix 2) expert pairs, all layers."""
    t = data["topk_df"]
    t = t[t["topk_ix"].isin([1, 2])]
    keys = ["q_ix", "token_ix", "layer_ix"]
    first = t[t["topk_ix"] == 1][[*keys, "expert"]].rename(columns={"expert": "first"})
    second = t[t["topk_ix"] == 2][[*keys, "expert"]].rename(columns={"expert": "second"})
    pairs = first.merge(second, on=keys, how="inner").merge(_labels(data["sample_df"]), on=["q_ix", "token_ix"], how="left")
    item_cols = ["layer_ix", "first", "second"]
    dom_x = pairs.groupby(["domain", "lang", *item_cols]).size().reset_index(name="n_samples")
    return _select(dom_x, item_cols, test_domain, test_lang, threshold)


def exportable_json(spec: pd.DataFrame) -> str:
    """``jsonlite::toJSON(exportable_format, simplifyVector = F, auto_unbox = T, pretty = F)``.

    {"<target layer>": [[prefix, target], ...]}: keys in numeric layer order (dplyr's
    summarise by the integer target_layer), a length-1 prefix unboxed to a bare integer.
    An empty selection is R's empty named list, written ``{}``.
    """
    parts = []
    for layer, rows in spec.groupby("layer_ix", sort=True):
        rules = ",".join(f"[{int(p)},{int(e)}]" for p, e in zip(rows["prev_expert"], rows["expert"]))
        parts.append(f'"{int(layer)}":[{rules}]')
    return "{" + ",".join(parts) + "}"
