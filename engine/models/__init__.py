"""Router adapters: one small class per transformers 5.x MoE family, one registry.

``adapter_for(model)`` returns the adapter whose router class the model uses (keyed on the
router class name); ``adapter.find_routers(model)`` lists its ``RouterSite``s in layer order.
Every covered family is tested (tests/test_intervene.py) with a tiny random config of the real
transformers class: with no intervention the patched model's logits equal the original's.

Covered (router forward returns ``(router_logits [T,E], weights [T,K], indices [T,K] int64)``):

| family(ies) | router class | scoring | renormalize | scaling / bias | weights dtype |
|---|---|---|---|---|---|
| olmoe, qwen2_moe, qwen3_moe, qwen3_next, flex_olmo, mellum | ``*TopKRouter`` | softmax | ``norm_topk_prob`` | - | logits |
| qwen3_5_moe | Qwen3_5MoeTopKRouter | softmax | always | - | logits |
| jamba | JambaTopKRouter | softmax | never | - | input |
| mixtral, minimax | ``*TopKRouter`` | softmax (fp32) | always | - | fp32 |
| gpt_oss | GptOssTopKRouter | top-k of logits (+ linear bias), softmax over the K | always (same routing) | bias inside the logits | logits |
| aria | AriaTextTopKRouter | top-k of logits, softmax over the K | always (same routing) | - | logits |
| granitemoe (+ granitemoe_swa, granitemoeshared) | GraniteMoe*TopKRouter | fp32 logits, top-k, softmax over the K | always (same routing) | - | input |
| cohere2_moe | Cohere2MoeTopKRouter | ``expert_selection_fn``: softmax over the K, or sigmoid | softmax: always; sigmoid: ``norm_topk_prob`` | - | input |
| deepseek_v2 | DeepseekV2TopkRouter (``topk_method="greedy"``) | fp32 softmax | never | ``routed_scaling_factor`` | fp32 |
| deepseek_v3, deepseek_v32, dots1, glm4_moe, glm4_moe_lite, glm_moe_dsa, hy_v4, solar_open, exaone_moe, axk1, dots3_note (text), nemotron_h, bailing_hybrid, kimi_linear | ``*TopkRouter`` | fp32 sigmoid; ``e_score_correction_bias`` for selection; group-limited (``n_group``/``topk_group``, group score = sum of its top 2) | ``norm_topk_prob`` | ``routed_scaling_factor`` | fp32 |
| minimax_m2 | MiniMaxM2TopKRouter | sigmoid, bias passed by the MoE block | always | - | fp32 |
| minimax_m3_vl (text) | MiniMaxM3VLTopKRouter | sigmoid, bias buffer | always | - | fp32 |
| hy_v3 | HYV3TopKRouter | fp32 sigmoid, bias passed by the block | always | ``router_scaling_factor`` | fp32 |
| laguna | LagunaTopKRouter | fp32 logits, tanh soft-cap, sigmoid + bias | always | - | input |
| flint | FlintTopKRouter | fp32 sigmoid, no bias | ``norm_topk_prob`` | - | fp32 |
| inkling2 | Inkling2TopKRouter (``scoring_func="sigmoid"``) | fp32 sigmoid + bias | always | ``routed_scaling_factor`` | fp32 |
| lfm2_moe | Lfm2MoeTopKRouter | sigmoid, ``expert_bias`` passed by the block when ``use_expert_bias`` | ``norm_topk_prob`` (eps 1e-6 there, 1e-20 here: weights agree to ~1e-6) | ``routed_scaling_factor`` | logits |

Shared experts (Qwen2-MoE, DeepSeek-V3, ...) live in the MoE block outside the router: always on,
untouched by interventions. DeepSeek-V3-style routers return their K experts unsorted
(``topk(sorted=False)``); patched routers return them in rank order (same set, same weights).

Not covered (a model of these families gets a MoetraceError listing the covered ones):

| family | why |
|---|---|
| phimoe | sparsemixer: the second expert is chosen after masking around the first, with jitter; not a top-k of one score |
| kolibri1 | selects by logits + bias, weights sigmoid(logits): the bias acts on logits, not on the scores |
| ernie4_5_moe, ernie4_5_vl_moe | softmax with a bias added to the probabilities for selection and a clamped renormalization |
| longcat_flash | softmax with a selection bias, and "zero experts" beyond the real ones |
| mistral4, mistral_large4 | softmax scores with group-limited selection (the kernel groups sigmoid scores only) |
| deepseek_v2 ``group_limited_greedy``, deepseek_ocr2, unlimited_ocr | group score is the group's max (not the sum of its top 2) |
| axk2 | group-limited selection fills dropped groups with 0.0 rather than -inf, and groups are optional |
| deepseek_v4 | the first MoE layers use hash routing (another router class); the rest a configurable score function |
| inkling | the router also scores shared experts and returns a 4-tuple |
| openai_privacy_filter | GPT-OSS-like router divided by K, but a token-classification model (no causal LM to test) |
| step3p7, mimo_v2_flash, muse_spark, beam, glm5_next, glm4v_moe, qwen3_vl_moe, qwen3_omni_moe, qwen4_exp, granitemoehybrid | routing the kernel can express, but no tiny config of these (multimodal / hybrid) classes builds and runs here yet; add the adapter together with its tiny config in tests/tiny_models.py |
| dbrx, llama4, jetmoe, hunyuan_v1_moe, afmoe, gemma4, zaya, switch_transformers, nllb_moe, diffusion_gemma | no ``*TopKRouter`` module returning ``(logits, weights, indices)`` |
"""

from moetrace.models import sigmoid, softmax  # noqa: F401  (registers the adapters)
from moetrace.models.base import RouterAdapter, RouterSite, RouteSpec
from moetrace.models.registry import adapter_for, register, supported_families, supported_router_classes

__all__ = [
    "RouteSpec",
    "RouterAdapter",
    "RouterSite",
    "adapter_for",
    "register",
    "supported_families",
    "supported_router_classes",
]
