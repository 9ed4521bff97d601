"""Tiny randomly initialized MoE models of the real transformers classes, for tests.

``tiny_model(name)`` builds a float32 causal LM of the transformers family named by ``name`` (a
key of ``TINY``) with 3 decoder layers, hidden size 32, 8 experts, top-2 and a 64-token vocabulary,
seeded, in eval mode. Router weights are drawn with a larger spread than the default init
(so routing is decisive and an ablation visibly changes the output), and every selection bias
(``e_score_correction_bias``, LFM2's ``expert_bias``, GPT-OSS's router bias) is random, so bias handling is exercised.
"""

from __future__ import annotations

import functools
import importlib
import re

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

VOCAB = 64
HIDDEN = 32
N_EXPERTS = 8
TOP_K = 2

# Config fields set when the config class has them (transformers 5.x configs are dataclasses).
GENERIC = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=32,
    expert_intermediate_size=32, shared_expert_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=128,
    num_experts=N_EXPERTS, num_local_experts=N_EXPERTS, n_routed_experts=N_EXPERTS, moe_num_experts=N_EXPERTS,
    num_experts_per_tok=TOP_K, moe_topk=TOP_K, n_group=2, topk_group=1, first_k_dense_replace=0,
    n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)

HYBRID = ["linear_attention", "full_attention", "linear_attention"]

# test name -> (transformers.models module, config class name, extra config fields).
TINY: dict[str, tuple[str, str, dict]] = {
    "olmoe": ("olmoe", "OlmoeConfig", {"norm_topk_prob": False}),
    "qwen2_moe": ("qwen2_moe", "Qwen2MoeConfig", {"norm_topk_prob": False}),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeConfig", {"norm_topk_prob": True}),
    "flex_olmo": ("flex_olmo", "FlexOlmoConfig", {}),
    "qwen3_next": ("qwen3_next", "Qwen3NextConfig", {"layer_types": HYBRID}),
    "qwen3_5_moe": ("qwen3_5_moe", "Qwen3_5MoeTextConfig", {"layer_types": HYBRID}),
    "jamba": ("jamba", "JambaConfig", {"attn_layer_period": 2, "attn_layer_offset": 1,
                                       "expert_layer_period": 1, "expert_layer_offset": 0}),
    "mellum": ("mellum", "MellumConfig", {}),
    "mixtral": ("mixtral", "MixtralConfig", {}),
    "minimax": ("minimax", "MiniMaxConfig", {}),
    "gpt_oss": ("gpt_oss", "GptOssConfig", {}),
    "aria": ("aria", "AriaTextConfig", {}),
    "granitemoe": ("granitemoe", "GraniteMoeConfig", {}),
    "granitemoe_swa": ("granitemoe_swa", "GraniteMoeSWAConfig", {}),
    "granitemoeshared": ("granitemoeshared", "GraniteMoeSharedConfig", {}),
    "cohere2_moe": ("cohere2_moe", "Cohere2MoeConfig", {"expert_selection_fn": "softmax"}),
    "cohere2_moe_sigmoid": ("cohere2_moe", "Cohere2MoeConfig",
                            {"expert_selection_fn": "sigmoid", "norm_topk_prob": True}),
    "deepseek_v2": ("deepseek_v2", "DeepseekV2Config", {"topk_method": "greedy", "routed_scaling_factor": 1.5}),
    "deepseek_v3": ("deepseek_v3", "DeepseekV3Config", {"routed_scaling_factor": 2.5, "norm_topk_prob": True}),
    "deepseek_v32": ("deepseek_v32", "DeepseekV32Config", {}),
    "dots1": ("dots1", "Dots1Config", {}),
    "glm4_moe": ("glm4_moe", "Glm4MoeConfig", {}),
    "glm4_moe_lite": ("glm4_moe_lite", "Glm4MoeLiteConfig", {}),
    "glm_moe_dsa": ("glm_moe_dsa", "GlmMoeDsaConfig", {}),
    "hy_v4": ("hy_v4", "HYV4Config", {}),
    "solar_open": ("solar_open", "SolarOpenConfig", {}),
    "exaone_moe": ("exaone_moe", "ExaoneMoeConfig", {}),
    "axk1": ("axk1", "AXK1Config", {}),
    "dots3_note": ("dots3_note", "Dots3NoteTextConfig", {}),
    "nemotron_h": ("nemotron_h", "NemotronHConfig", {"num_hidden_layers": 4,
                                                     "layers_block_type": ["moe", "full_attention", "moe", "moe"]}),
    "bailing_hybrid": ("bailing_hybrid", "BailingHybridConfig", {"layer_types": HYBRID}),
    "kimi_linear": ("kimi_linear", "KimiLinearConfig", {"layer_types": ["full_attention"] * 3}),
    "lfm2_moe": ("lfm2_moe", "Lfm2MoeConfig",
                 {"num_dense_layers": 0, "layer_types": ["conv", "full_attention", "conv"]}),
    "minimax_m2": ("minimax_m2", "MiniMaxM2Config", {}),
    "minimax_m3_vl": ("minimax_m3_vl", "MiniMaxM3VLTextConfig", {}),
    "hy_v3": ("hy_v3", "HYV3Config", {}),
    "laguna": ("laguna", "LagunaConfig", {"moe_router_logit_softcapping": 3.0}),
    "flint": ("flint", "FlintConfig", {"mlp_only_layers": []}),
    # unpadded_vocab_size (logits beyond it are masked) defaults to 200058: keep it inside the vocabulary.
    "inkling2": ("inkling2", "Inkling2TextConfig", {"unpadded_vocab_size": VOCAB}),
}

_ROUTER_RE = re.compile(r"Top[Kk]Router$")


def tiny_config(name: str, **overrides):
    """The tiny config of family ``name`` (``GENERIC`` fields it has, then ``TINY[name]``, then overrides)."""
    module_name, class_name, extra = TINY[name]
    module = importlib.import_module(f"transformers.models.{module_name}")
    config_cls = getattr(module, class_name)
    fields = set(config_cls.__dataclass_fields__)
    kwargs = {k: v for k, v in GENERIC.items() if k in fields}
    kwargs.update(extra)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 eval-mode causal LM of family ``name`` with random weights (``seed``).

    Skips the calling test when this transformers release cannot run the family at all, without
    moetrace (:func:`upstream_failure`): that is the release's bug, named in the skip reason
    (``-ra`` lists it), not a moetrace result.
    """
    failure = upstream_failure(name)
    if failure is not None:
        pytest.skip(f"transformers {transformers.__version__}: a plain {name} model fails without moetrace "
                    f"({failure})")
    return _build(name, seed, **overrides)


@functools.lru_cache(maxsize=None)
def upstream_failure(name: str) -> str | None:
    """None when a plain tiny ``name`` model (no moetrace anywhere) runs a forward and a 2-token greedy
    ``generate`` in the installed transformers; else that error, in one line."""
    model = _build(name, 0)
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(input_ids=ids)
            model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    except Exception as exc:  # noqa: BLE001 (any failure of the plain model is the release's)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _build(name: str, seed: int, **overrides) -> torch.nn.Module:
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if _ROUTER_RE.search(type(module).__name__):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.5)
                if isinstance(getattr(module, "bias", None), torch.Tensor):
                    module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.5)
        for buffer_name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if buffer_name.endswith(("e_score_correction_bias", "expert_bias")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return model.eval()
