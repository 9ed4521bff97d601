"""Fused masked MoE routing: one Triton kernel per router call, and its plain-torch reference.

Layout (as in Liger-Kernel's ops files):

- ``_route_kernel``: the private Triton kernel, one program per block of ``BLOCK_T`` rows;
- ``_route_backward_kernel``: the gradient of the weights w.r.t. the logits (same grid);
- ``route_forward`` / ``route_backward``: launchers (validate, allocate, pick the grid, launch);
- ``moetrace::route`` / ``moetrace::route_backward``: the launch registered as torch custom ops
  (fake implementations + the closed-form backward as the autograd formula), so torch.compile
  sees one op per router call; this is the kernel's only autograd path;
- ``route_reference``: the plain-torch reference with exactly the same semantics
  (differentiable through ordinary autograd);
- ``fused_route``: the public entry point that picks a backend.

Semantics (``logits`` ``[T, E]``, ``top_k = K``; all arithmetic in fp32, fp64 for fp64 logits):

1. Row mask ``M [T, E]`` (True = masked) = ``expert_mask`` (``[E]`` broadcast or ``[T, E]``)
   OR ``path_table[prev_top1[t], :]`` for rows with ``prev_top1[t] >= 0``.
2. Selection score ``c``:
   softmax: ``c = z = logits + logit_boost``;
   sigmoid: ``s = sigmoid(logits)``, ``c = (s + bias) + logit_boost``.
   A NaN ``c`` (NaN logit, bias or boost) counts as ``-inf``.
3. ``mask_mode="reroute"``: ``c[M] = -inf`` (the token goes to its next-best expert; for
   softmax the masked expert also leaves the distribution). ``"zero"``: ``c`` unchanged.
4. Group-limited selection (sigmoid only, ``n_group`` given): the ``E`` experts form
   ``n_group`` contiguous groups; group score = sum of the two largest ``c`` in the group;
   the ``topk_group`` best groups are kept (ties: lower group index), ``c = -inf`` elsewhere.
5. Order the experts by ``c`` descending, ties toward the lower expert index (so experts whose
   ``c`` is -inf come last, in index order: when fewer than K experts have a finite ``c``, the
   remaining ranks are filled by the lowest-index experts not yet selected; expert ids are
   always in ``[0, E)``).
6. Pair rule (only when ``K >= 2``): with ``first, second`` the two best experts, if
   ``pair_table[first, second]`` then ``second`` is dropped: in reroute mode ``c[second] = -inf``
   (and, for softmax, it leaves the distribution) and the ordering is redone; in zero mode its
   weight is set to 0. Groups are not re-scored after a pair drop.
7. ``experts = order[:, :K]`` (rank 0 = highest ``c``), ``top1 = experts[:, 0]``.
8. Weights: softmax: ``p = softmax(c)`` over the row (with the reroute masks as ``-inf``),
   ``w = p[experts]``, if ``renormalize``: ``w /= sum(w)``;
   sigmoid: ``w = s[experts]`` (not ``c``), if ``renormalize``: ``w /= (sum(w) + 1e-20)``.
   A rank whose ``c`` is -inf (a filled rank, step 5) has ``w = 0`` before renormalizing; a
   row with no finite ``c`` has all weights 0 (never NaN). Then ``w *= routed_scaling``.
9. Zero mode: ``w[k] = 0`` where ``M[t, experts[t, k]]`` or (``k == 1`` and the pair rule fired);
   the other weights keep the value they would have had (denominators as if unmasked).
10. ``w *= weight_scale[experts]``.

In reroute mode a row needs ``K`` selectable experts (``K + 1`` with pair rules, and ``K`` in its
kept groups); with ``validate`` (the default) a row that the masks leave short raises ValueError
(before launch where the masks alone decide it). Without ``validate`` (or when non-finite
scores, not masks, leave fewer than K) step 5's filling applies: weight 0, never NaN, never an
id outside ``[0, E)``; the gradient of a filled rank's weight is 0. A ``+inf`` score is not
defined (ids stay in ``[0, E)``, weights may be NaN). For sigmoid scoring with a bias, rank 0 is the best selection score ``c``,
which need not carry the largest weight ``s``.

Differences from the libraries this reproduces:

- softmax selection is done on the logits (softmax is monotone), not on the probabilities, so
  that two different logits whose ``exp`` rounds to the same fp32 value are not a tie;
- ties go to the lower expert index (like vLLM's and SGLang's routing kernels);
  ``torch.topk`` does not promise any tie order;
- DeepSeek-V3 (transformers ``DeepseekV3TopkRouter``) uses ``topk(sorted=False)``, so its expert
  order is unspecified; here experts come in descending selection score ``c = s + bias`` and the
  group ranking breaks ties toward the lower group index. Weights are identical.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moetrace.kernels.modes import MASK_MODES

__all__ = [
    "fused_route",
    "route_reference",
    "route_forward",
    "route_backward",
    "RouteOptions",
    "RouteState",
    "route_options",
    "MAX_EXPERTS",
    "MAX_TOP_K",
]

MAX_EXPERTS = 512
MAX_TOP_K = 16
_SIGMOID_RENORM_EPS = 1e-20  # transformers DeepseekV3TopkRouter: denominator + 1e-20
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _route_kernel(
    logits_ptr,
    stride_lt,
    bias_ptr,
    boost_ptr,
    scale_ptr,
    mask_ptr,
    stride_mt,
    path_ptr,
    prev_ptr,
    pair_ptr,
    w_ptr,
    e_ptr,
    top1_ptr,
    drop_ptr,
    live_ptr,
    T,
    routed_scaling,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BOOST: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PATH: tl.constexpr,
    HAS_PAIR: tl.constexpr,
    ZERO_MODE: tl.constexpr,
    N_GROUP: tl.constexpr,
    TOPK_GROUP: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Route BLOCK_T rows: logits [T, E] -> weights [T, K] fp32, experts [T, K] int32, top1 [T].

    The whole row (BLOCK_E >= E columns) sits in registers; top-k is K unrolled argmax rounds
    over the columns not yet taken, each taking the lowest column index among the maxima (so a
    round whose best score is -inf takes the lowest-index free expert: never an id outside
    [0, E)). See the module docstring for the formulas. ``live`` [T] = ranks with a finite score.
    """
    NEG = _NEG_INF
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)

    x = tl.load(logits_ptr + rows64[:, None] * stride_lt + cols[None, :], mask=ok, other=0.0)
    x = x.to(tl.float32)

    # 1. row mask M
    masked = (rows[:, None] < 0) & (cols[None, :] < 0)
    if HAS_MASK:
        mk = tl.load(mask_ptr + rows64[:, None] * stride_mt + cols[None, :], mask=ok, other=0)
        masked = masked | (mk != 0)
    if HAS_PATH:
        prev = tl.load(prev_ptr + rows, mask=row_ok, other=-1)
        has_prev = prev >= 0
        prev64 = tl.where(has_prev, prev, 0).to(tl.int64)
        pm = tl.load(path_ptr + prev64[:, None] * E + cols[None, :], mask=ok & has_prev[:, None], other=0)
        masked = masked | (pm != 0)

    # 2. selection score c
    if SIGMOID:
        s = 1.0 / (1.0 + tl.exp(-x))
        c = s
        if HAS_BIAS:
            c = c + tl.load(bias_ptr + cols, mask=col_ok, other=0.0)[None, :]
    else:
        c = x
    if HAS_BOOST:
        c = c + tl.load(boost_ptr + cols, mask=col_ok, other=0.0)[None, :]
    c = tl.where(c != c, NEG, c)  # NaN scores count as -inf
    # 3. reroute masks; padding columns never win
    if not ZERO_MODE:
        c = tl.where(masked, NEG, c)
    c = tl.where(col_ok[None, :], c, NEG)

    # 4. group-limited selection
    if N_GROUP > 0:
        gcols = tl.arange(0, BLOCK_G)
        grp = cols // GROUP_SIZE
        gscore = tl.full((BLOCK_T, BLOCK_G), NEG, tl.float32)
        for g in tl.static_range(N_GROUP):
            v = tl.where((grp == g)[None, :], c, NEG)
            m1 = tl.max(v, axis=1)
            i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], BLOCK_E), axis=1)
            m2 = tl.max(tl.where(cols[None, :] == i1[:, None], NEG, v), axis=1)
            gscore = tl.where(gcols[None, :] == g, (m1 + m2)[:, None], gscore)
        allowed = (rows[:, None] < 0) & (cols[None, :] < 0)
        for g in tl.static_range(N_GROUP):
            sg = tl.max(tl.where(gcols[None, :] == g, gscore, NEG), axis=1)
            ahead = (gscore > sg[:, None]) | ((gscore == sg[:, None]) & (gcols[None, :] < g))
            ahead = ahead & (gcols[None, :] < N_GROUP)
            kept = tl.sum(ahead.to(tl.int32), axis=1) < TOPK_GROUP
            allowed = allowed | ((grp == g)[None, :] & kept[:, None])
        c = tl.where(allowed, c, NEG)

    # 5-7. K argmax rounds over the free columns (lowest index among equal maxima), pair rule at rank 1
    work = c
    free = (rows[:, None] >= 0) & col_ok[None, :]
    sel_idx = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    sel_val = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    sel_s = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    zeroed = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    first = tl.zeros((BLOCK_T,), dtype=tl.int32)
    top1 = tl.zeros((BLOCK_T,), dtype=tl.int32)
    dropped = tl.full((BLOCK_T,), -1, tl.int32)
    for r in tl.static_range(K):
        m = tl.max(tl.where(free, work, NEG), axis=1)
        idx = tl.min(tl.where(free & (work == m[:, None]), cols[None, :], BLOCK_E), axis=1)
        if HAS_PAIR:
            if r == 1:
                pv = tl.load(pair_ptr + first.to(tl.int64) * E + idx, mask=row_ok & (idx < E), other=0)
                fire = pv != 0
                dropped = tl.where(fire, idx, -1)
                if ZERO_MODE:
                    zeroed = tl.where((kcols[None, :] == 1) & fire[:, None], 1, zeroed)
                else:
                    gone = (cols[None, :] == idx[:, None]) & fire[:, None]
                    work = tl.where(gone, NEG, work)
                    c = tl.where(gone, NEG, c)
                    m = tl.max(tl.where(free, work, NEG), axis=1)
                    idx = tl.min(tl.where(free & (work == m[:, None]), cols[None, :], BLOCK_E), axis=1)
        if r == 0:
            first = idx
        hit = cols[None, :] == idx[:, None]
        if ZERO_MODE:
            mz = tl.max(tl.where(hit & masked, 1, 0), axis=1)
            zeroed = tl.where(kcols[None, :] == r, tl.maximum(zeroed, mz[:, None]), zeroed)
        if SIGMOID:
            s_r = tl.sum(tl.where(hit, s, 0.0), axis=1)
            sel_s = tl.where(kcols[None, :] == r, s_r[:, None], sel_s)
        if r == 0:
            top1 = idx
        sel_idx = tl.where(kcols[None, :] == r, idx[:, None], sel_idx)
        sel_val = tl.where(kcols[None, :] == r, m[:, None], sel_val)
        free = free & ~hit

    # 8-10. weights (ranks whose score is -inf: weight 0)
    k_ok = (kcols < K)[None, :]
    live = k_ok & (sel_val != NEG)
    if SIGMOID:
        w = tl.where(live, sel_s, 0.0)
        if RENORM:
            w = w / (tl.sum(w, axis=1)[:, None] + 1e-20)
    else:
        m0 = tl.max(c, axis=1)
        m0 = tl.where(m0 == NEG, 0.0, m0)  # a row without a finite score: every weight is 0
        denom = tl.sum(tl.exp(c - m0[:, None]), axis=1)
        w = tl.where(live, tl.exp(sel_val - m0[:, None]) / tl.where(denom == 0.0, 1.0, denom)[:, None], 0.0)
        if RENORM:
            tot = tl.sum(w, axis=1)
            w = w / tl.where(tot == 0.0, 1.0, tot)[:, None]
    w = w * routed_scaling
    if ZERO_MODE:
        w = tl.where(zeroed != 0, 0.0, w)
    out_ok = row_ok[:, None] & k_ok
    if HAS_SCALE:
        sc = tl.load(scale_ptr + sel_idx, mask=out_ok, other=1.0)
        w = w * sc
    out_off = rows64[:, None] * K + kcols[None, :]
    tl.store(w_ptr + out_off, w, mask=out_ok)
    tl.store(e_ptr + out_off, sel_idx, mask=out_ok)
    tl.store(top1_ptr + rows, top1, mask=row_ok)
    tl.store(live_ptr + rows, tl.sum(live.to(tl.int32), axis=1), mask=row_ok)
    if HAS_PAIR:
        tl.store(drop_ptr + rows, dropped, mask=row_ok)


@triton.jit
def _route_backward_kernel(
    gw_ptr,
    logits_ptr,
    stride_lt,
    e_ptr,
    boost_ptr,
    scale_ptr,
    mask_ptr,
    stride_mt,
    path_ptr,
    prev_ptr,
    drop_ptr,
    live_ptr,
    gx_ptr,
    T,
    routed_scaling,
    E: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
    HAS_BOOST: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_PATH: tl.constexpr,
    HAS_DROP: tl.constexpr,
    ZERO_MODE: tl.constexpr,
):
    """d logits [T, E] from d weights [T, K], the selection experts [T, K] held fixed.

    Formulas: ``route_backward``. Every element of the BLOCK_T rows of ``gx`` is written
    (zeros where the gradient is zero). Ranks ``k >= live[t]`` (selected with a -inf score,
    weight 0 whatever the logits) get no gradient and leave the renormalization sums.
    """
    NEG = _NEG_INF
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    row_ok = rows < T
    col_ok = cols < E
    ok = row_ok[:, None] & col_ok[None, :]
    k_ok = row_ok[:, None] & (kcols < K)[None, :]
    rows64 = rows.to(tl.int64)
    k_off = rows64[:, None] * K + kcols[None, :]

    e = tl.load(e_ptr + k_off, mask=k_ok, other=0)
    n_live = tl.load(live_ptr + rows, mask=row_ok, other=0)
    k_ok = k_ok & (kcols[None, :] < n_live[:, None])
    a = tl.load(gw_ptr + k_off, mask=k_ok, other=0.0).to(tl.float32) * routed_scaling
    if HAS_SCALE:
        a = a * tl.load(scale_ptr + e, mask=k_ok, other=1.0)
    if HAS_PATH:
        prev = tl.load(prev_ptr + rows, mask=row_ok, other=-1)
        has_prev = prev >= 0
        prev64 = tl.where(has_prev, prev, 0).to(tl.int64)
    if HAS_DROP:
        dropped = tl.load(drop_ptr + rows, mask=row_ok, other=-1)
    if ZERO_MODE:
        zeroed = (rows[:, None] < 0) & (kcols[None, :] < 0)
        if HAS_MASK:
            zeroed = zeroed | (tl.load(mask_ptr + rows64[:, None] * stride_mt + e, mask=k_ok, other=0) != 0)
        if HAS_PATH:
            pm = tl.load(path_ptr + prev64[:, None] * E + e, mask=k_ok & has_prev[:, None], other=0)
            zeroed = zeroed | (pm != 0)
        if HAS_DROP:
            zeroed = zeroed | ((kcols[None, :] == 1) & (dropped >= 0)[:, None])
        a = tl.where(zeroed, 0.0, a)
    a = tl.where(k_ok, a, 0.0)

    if SIGMOID or RENORM:
        # the gradient lives on the K selected columns: compute it there, then scatter
        x_sel = tl.load(logits_ptr + rows64[:, None] * stride_lt + e, mask=k_ok, other=0.0).to(tl.float32)
        if SIGMOID:
            s = tl.where(k_ok, 1.0 / (1.0 + tl.exp(-x_sel)), 0.0)
            if RENORM:
                d = tl.sum(tl.where(k_ok, s, 0.0), axis=1)[:, None] + 1e-20
                gs = a / d - tl.sum(a * s, axis=1)[:, None] / (d * d)
            else:
                gs = a
            g_sel = gs * s * (1.0 - s)
        else:
            z_sel = x_sel
            if HAS_BOOST:
                z_sel = z_sel + tl.load(boost_ptr + e, mask=k_ok, other=0.0)
            z_sel = tl.where(k_ok, z_sel, NEG)
            m = tl.max(z_sel, axis=1)
            m = tl.where(m == NEG, 0.0, m)  # rows past T: keep the arithmetic finite
            q = tl.exp(z_sel - m[:, None])
            q = q / tl.maximum(tl.sum(q, axis=1), 1e-30)[:, None]
            g_sel = q * (a - tl.sum(a * q, axis=1)[:, None])
        grad = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for k in tl.static_range(K):
            ek = tl.sum(tl.where(kcols[None, :] == k, e, 0), axis=1)
            gk = tl.sum(tl.where(kcols[None, :] == k, g_sel, 0.0), axis=1)
            grad = tl.where(cols[None, :] == ek[:, None], gk[:, None], grad)
    else:
        # softmax without renormalization: every column of the row gets -p_j * sum_k a_k p_{e_k}
        z = tl.load(logits_ptr + rows64[:, None] * stride_lt + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        if HAS_BOOST:
            z = z + tl.load(boost_ptr + cols, mask=col_ok, other=0.0)[None, :]
        z = tl.where(z != z, NEG, z)
        if not ZERO_MODE:
            if HAS_MASK:
                mk = tl.load(mask_ptr + rows64[:, None] * stride_mt + cols[None, :], mask=ok, other=0)
                z = tl.where(mk != 0, NEG, z)
            if HAS_PATH:
                pm = tl.load(path_ptr + prev64[:, None] * E + cols[None, :], mask=ok & has_prev[:, None], other=0)
                z = tl.where(pm != 0, NEG, z)
            if HAS_DROP:
                z = tl.where(cols[None, :] == dropped[:, None], NEG, z)
        z = tl.where(col_ok[None, :], z, NEG)
        m = tl.max(z, axis=1)
        m = tl.where(m == NEG, 0.0, m)
        p = tl.exp(z - m[:, None])
        p = p / tl.maximum(tl.sum(p, axis=1), 1e-30)[:, None]
        a_full = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for k in tl.static_range(K):
            ek = tl.sum(tl.where(kcols[None, :] == k, e, 0), axis=1)
            ak = tl.sum(tl.where(kcols[None, :] == k, a, 0.0), axis=1)
            hit = cols[None, :] == ek[:, None]
            dot += ak * tl.sum(tl.where(hit, p, 0.0), axis=1)
            a_full = tl.where(hit, ak[:, None], a_full)
        grad = p * (a_full - dot[:, None])
    tl.store(gx_ptr + rows64[:, None] * E + cols[None, :], grad.to(gx_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- options / checks


@dataclass(frozen=True)
class RouteOptions:
    """Validated routing options (everything but the logits), tensors on the logits' device.

    Built by ``route_options``; fields as in ``fused_route``; ``bias``/``logit_boost``/
    ``weight_scale`` are fp32 [E], ``prev_top1`` int32 [T], masks and tables bool.
    """

    top_k: int
    renormalize: bool
    scoring: str
    bias: torch.Tensor | None
    n_group: int | None
    topk_group: int | None
    routed_scaling: float
    expert_mask: torch.Tensor | None
    mask_mode: str
    path_table: torch.Tensor | None
    prev_top1: torch.Tensor | None
    pair_table: torch.Tensor | None
    logit_boost: torch.Tensor | None
    weight_scale: torch.Tensor | None


class RouteState(NamedTuple):
    """What the backward needs from a forward besides the experts.

    ``dropped``: int32 [T], the expert a pair rule dropped (reroute) or zeroed (zero mode), -1 for
    none; None when no pair rule applies. ``live``: int32 [T], the number of leading ranks whose
    selection score is finite (ranks ``k >= live`` were filled with weight 0, see the semantics).
    """

    dropped: torch.Tensor | None
    live: torch.Tensor


def _vector(name: str, v, E: int, device) -> torch.Tensor | None:
    if v is None:
        return None
    v = torch.as_tensor(v)
    if v.shape != (E,) or not v.is_floating_point():
        raise ValueError(f"{name}: expected a float tensor of shape ({E},), got {v.dtype} {tuple(v.shape)}")
    return v.to(device=device, dtype=torch.float32).contiguous()


def _table(name: str, v, E: int, device) -> torch.Tensor | None:
    if v is None:
        return None
    v = torch.as_tensor(v)
    if v.shape != (E, E) or v.dtype != torch.bool:
        raise ValueError(f"{name}: expected a bool tensor of shape ({E}, {E}), got {v.dtype} {tuple(v.shape)}")
    return v.to(device).contiguous()


def route_options(logits, top_k, *, renormalize=False, scoring="softmax", bias=None, n_group=None, topk_group=None,
                  routed_scaling=1.0, expert_mask=None, mask_mode="reroute", path_table=None, prev_top1=None,
                  pair_table=None, logit_boost=None, weight_scale=None, validate=True) -> RouteOptions:
    """Check every argument of ``fused_route`` against ``logits [T, E]`` and return a ``RouteOptions``.

    Raises ValueError naming the argument, what was expected and what was got. Shapes, dtypes and
    kinds are static checks; ``validate`` adds the one data-dependent check here (``prev_top1 < E``).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = f"{logits.dtype} {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits: expected a float tensor of shape [T, E], got {got}")
    T, E = logits.shape
    dev = logits.device
    if E < 1:
        raise ValueError("logits: expected at least one expert column, got E = 0")
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected an int in [1, {E}] (E = {E}), got {top_k!r}")
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode: expected one of {list(MASK_MODES)}, got {mask_mode!r}")
    if bias is not None and scoring != "sigmoid":
        raise ValueError("bias: the score-correction bias applies to scoring='sigmoid' only, got scoring='softmax'")
    if (n_group is None) != (topk_group is None):
        raise ValueError(f"n_group/topk_group: give both or neither, "
                         f"got n_group={n_group!r}, topk_group={topk_group!r}")
    if n_group is not None:
        if scoring != "sigmoid":
            raise ValueError("n_group: group-limited selection applies to scoring='sigmoid' only, got 'softmax'")
        if not isinstance(n_group, int) or n_group < 1 or E % n_group or E // n_group < 2:
            raise ValueError(f"n_group: expected a divisor of E = {E} leaving >= 2 experts per group, got {n_group!r}")
        if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group: expected an int in [1, {n_group}], got {topk_group!r}")
        if topk_group * (E // n_group) < top_k:
            raise ValueError(f"topk_group: {topk_group} groups of {E // n_group} experts cannot hold top_k = {top_k}")
    if expert_mask is not None:
        expert_mask = torch.as_tensor(expert_mask)
        if expert_mask.dtype != torch.bool or expert_mask.shape not in ((E,), (T, E)):
            raise ValueError(f"expert_mask: expected a bool tensor of shape ({E},) or ({T}, {E}), "
                             f"got {expert_mask.dtype} {tuple(expert_mask.shape)}")
        expert_mask = expert_mask.to(dev).contiguous()
    path_table = _table("path_table", path_table, E, dev)
    pair_table = _table("pair_table", pair_table, E, dev)
    if (path_table is None) != (prev_top1 is None):
        raise ValueError("path_table/prev_top1: give both or neither")
    if prev_top1 is not None:
        prev_top1 = torch.as_tensor(prev_top1)
        if prev_top1.shape != (T,) or prev_top1.is_floating_point() or prev_top1.dtype == torch.bool:
            raise ValueError(f"prev_top1: expected an int tensor of shape ({T},), "
                             f"got {prev_top1.dtype} {tuple(prev_top1.shape)}")
        prev_top1 = prev_top1.to(device=dev, dtype=torch.int32).contiguous()
        if validate and T and int(prev_top1.max()) >= E:
            raise ValueError(f"prev_top1: expected values < E = {E} (negative = no previous layer), "
                             f"got {int(prev_top1.max())}")
    return RouteOptions(
        top_k=top_k, renormalize=bool(renormalize), scoring=scoring,
        bias=_vector("bias", bias, E, dev), n_group=n_group, topk_group=topk_group,
        routed_scaling=float(routed_scaling), expert_mask=expert_mask, mask_mode=mask_mode,
        path_table=path_table, prev_top1=prev_top1, pair_table=pair_table,
        logit_boost=_vector("logit_boost", logit_boost, E, dev),
        weight_scale=_vector("weight_scale", weight_scale, E, dev),
    )


def _row_mask(o: RouteOptions, T: int, E: int) -> torch.Tensor | None:
    """M [T, E] bool: expert mask OR the path-table row of each token's previous top-1 (or None)."""
    m = None
    if o.expert_mask is not None:
        m = o.expert_mask.expand(T, E)
    if o.path_table is not None:
        has_prev = o.prev_top1 >= 0
        pm = o.path_table[o.prev_top1.clamp(min=0).long()] & has_prev[:, None]
        m = pm if m is None else (m | pm)
    return m


_ROW_OK_CACHE: dict[tuple, tuple] = {}


def _every_row_ok(o: RouteOptions, E: int, need: int) -> bool:
    """True when any row, whatever its prev_top1, keeps >= need experts under an [E] mask and path table.

    Depends only on (expert_mask [E], path_table [E, E]); a positive answer is cached per tensor
    object and version (``Tensor._version`` moves on every in-place change), so repeated calls
    with the same intervention tensors on the logits' device need no device-to-host sync.
    """
    tensors = [t for t in (o.expert_mask, o.path_table) if t is not None]
    key = (tuple((id(t), t._version) for t in tensors), E, need)
    hit = _ROW_OK_CACHE.get(key)
    if hit is not None and all(ref() is t for ref, t in zip(hit, tensors)):
        return True
    base = o.expert_mask if o.expert_mask is not None else torch.zeros(E, dtype=torch.bool, device=tensors[0].device)
    worst = E - base.sum()
    if o.path_table is not None:
        worst = torch.minimum(worst, (E - (base[None, :] | o.path_table).sum(dim=1)).min())
    if int(worst) < need:
        return False
    if len(_ROW_OK_CACHE) > 1024:
        _ROW_OK_CACHE.clear()
    _ROW_OK_CACHE[key] = tuple(weakref.ref(t) for t in tensors)
    return True


def _check_selectable(o: RouteOptions, T: int, E: int) -> None:
    """Raise before launch if some row has fewer than K (K + 1 with pair rules) selectable experts (reroute)."""
    need = o.top_k + (1 if o.pair_table is not None and o.top_k >= 2 else 0)
    if o.mask_mode != "reroute" or T == 0 or need == o.top_k and o.expert_mask is None and o.path_table is None:
        return
    if o.expert_mask is None and o.path_table is None:
        if E < need:
            raise ValueError(f"pair_table: top_k = {o.top_k} of E = {E} experts leaves no expert for a pair rule "
                             f"to reroute to (needs E >= top_k + 1)")
        return
    if (o.expert_mask is None or o.expert_mask.dim() == 1) and _every_row_ok(o, E, need):
        return
    if o.expert_mask is not None and o.expert_mask.dim() == 2:
        free = E - _row_mask(o, T, E).sum(dim=1)
    else:
        base = o.expert_mask
        if base is None:
            base = torch.zeros(E, dtype=torch.bool, device=o.path_table.device)
        if o.path_table is None:
            free = (E - base.sum()).reshape(1)
        else:
            per_prev = E - (base[None, :] | o.path_table).sum(dim=1)  # [E]
            free = torch.where(o.prev_top1 >= 0, per_prev[o.prev_top1.clamp(min=0).long()], E - base.sum())
    low = int(free.min())
    if low < need:
        row = int(torch.argmin(free)) if free.numel() > 1 else 0
        raise ValueError(f"expert_mask/path_table: row {row} keeps {low} selectable experts, top_k = {o.top_k} needs "
                         f"{need}{' (pair rules may drop one more)' if need > o.top_k else ''}")


def _check_kept_groups(logits: torch.Tensor, o: RouteOptions, live: torch.Tensor) -> None:
    """Group-limited reroute with masks or pair rules: raise when the masks (not non-finite scores)
    left a row fewer than K experts with a finite score in its kept groups (one host sync)."""
    if o.n_group is None or o.mask_mode != "reroute" or logits.shape[0] == 0 or (
            o.expert_mask is None and o.path_table is None and o.pair_table is None):
        return
    c, _ = _selection_scores(logits.detach().to(_compute_dtype(logits)), o)
    short = (live < o.top_k) & ((~torch.isneginf(c)).sum(dim=1) >= o.top_k)
    if bool(short.any()):
        row = int(torch.nonzero(short)[0, 0])
        raise ValueError(f"expert_mask/path_table: row {row} has fewer than top_k selectable experts "
                         "in its kept groups (n_group/topk_group)")


# ----------------------------------------------------------------------------- torch reference


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _stable_order(c: torch.Tensor) -> torch.Tensor:
    """Column indices of each row by descending value, ties toward the lower index."""
    return torch.sort(c.detach(), dim=1, descending=True, stable=True).indices


def _selection_scores(x: torch.Tensor, o: RouteOptions) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(selection score c [T, E] with NaN as -inf, before masks and groups; sigmoid s or None)."""
    s = None
    if o.scoring == "softmax":
        c = x if o.logit_boost is None else x + o.logit_boost.to(x.dtype)
    else:
        s = torch.sigmoid(x)
        c = s if o.bias is None else s + o.bias.to(x.dtype)
        if o.logit_boost is not None:
            c = c + o.logit_boost.to(x.dtype)
    return torch.nan_to_num(c, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")), s


def _route_torch(logits: torch.Tensor, o: RouteOptions):
    """Reference forward: (weights [T, K], experts [T, K] int32, top1 [T] int32, ``RouteState``)."""
    T, E = logits.shape
    K = o.top_k
    x = logits.to(_compute_dtype(logits))
    M = _row_mask(o, T, E)
    reroute = o.mask_mode == "reroute"
    c, s = _selection_scores(x, o)
    if M is not None and reroute:
        c = c.masked_fill(M, float("-inf"))
    if o.n_group is not None:
        G, gs = o.n_group, E // o.n_group
        top2 = torch.sort(c.detach().view(T, G, gs), dim=-1, descending=True).values[..., :2].sum(dim=-1)
        kept_groups = _stable_order(top2)[:, : o.topk_group]
        kept = torch.zeros(T, G, dtype=torch.bool, device=x.device).scatter(1, kept_groups, True)
        c = c.masked_fill(~kept.repeat_interleave(gs, dim=1), float("-inf"))
    order = _stable_order(c)
    dropped = None
    if o.pair_table is not None and K >= 2:
        first, second = order[:, 0], order[:, 1]
        fire = o.pair_table[first, second]
        dropped = torch.where(fire, second, -1).to(torch.int32)
        if reroute:
            gone = torch.zeros(T, E, dtype=torch.bool, device=x.device).scatter(1, second[:, None], fire[:, None])
            c = c.masked_fill(gone, float("-inf"))
            order = _stable_order(c)
    experts = order[:, :K]
    live = ~torch.isneginf(c.detach().gather(1, experts))  # [T, K]; False: filled rank, weight 0
    if o.scoring == "softmax":
        # a row without a finite score: softmax over zeros, then every weight is zeroed (no NaN)
        c_safe = torch.where(live[:, :1], c, torch.zeros_like(c))
        w = torch.softmax(c_safe, dim=-1).gather(1, experts)
        w = torch.where(live, w, torch.zeros_like(w))
        if o.renormalize:
            tot = w.sum(dim=-1, keepdim=True)
            w = w / torch.where(tot == 0, torch.ones_like(tot), tot)
    else:
        w = s.gather(1, experts)
        w = torch.where(live, w, torch.zeros_like(w))
        if o.renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + _SIGMOID_RENORM_EPS)
    w = w * o.routed_scaling
    if not reroute:
        zero = torch.zeros(T, K, dtype=torch.bool, device=x.device)
        if M is not None:
            zero = zero | M.gather(1, experts)
        if dropped is not None:
            zero[:, 1] |= dropped >= 0
        w = torch.where(zero, torch.zeros_like(w), w)
    if o.weight_scale is not None:
        w = w * o.weight_scale.to(w.dtype)[experts]
    experts = experts.to(torch.int32)
    return w, experts, experts[:, 0].contiguous(), RouteState(dropped, live.sum(dim=1, dtype=torch.int32))


def route_reference(logits, top_k, *, renormalize=False, scoring="softmax", bias=None, n_group=None,
                    topk_group=None, routed_scaling=1.0, expert_mask=None, mask_mode="reroute", path_table=None,
                    prev_top1=None, pair_table=None, logit_boost=None, weight_scale=None, validate=True):
    """Plain-torch routing with exactly the kernel's semantics (see the module docstring).

    Args:
        logits: [T, E] float (fp32/bf16/fp16 up-cast to fp32; fp64 stays fp64), any device.
        top_k: K, 1 <= K <= E.
        (the rest, ``validate`` included, as in ``fused_route``)
    Returns:
        weights [T, K] fp32 (fp64 for fp64 logits), differentiable w.r.t. ``logits`` by autograd;
        experts [T, K] int32 in rank order (selection uses a stable descending sort, so ties
        go to the lower expert index); top1 [T] int32 = experts[:, 0].
    Raises:
        ValueError: bad argument, or a row with too few selectable experts.
    """
    o = route_options(logits, top_k, renormalize=renormalize, scoring=scoring, bias=bias, n_group=n_group,
                      topk_group=topk_group, routed_scaling=routed_scaling, expert_mask=expert_mask,
                      mask_mode=mask_mode, path_table=path_table, prev_top1=prev_top1, pair_table=pair_table,
                      logit_boost=logit_boost, weight_scale=weight_scale, validate=validate)
    if validate:
        _check_selectable(o, *logits.shape)
    w, experts, top1, state = _route_torch(logits, o)
    if validate:
        _check_kept_groups(logits, o, state.live)
    return w, experts, top1


# ----------------------------------------------------------------------------- launcher / backward


_INTERPRETED: dict = {}


def _interpreted(kernel):
    """``kernel`` as an interpreter function, for CPU tensors under TRITON_INTERPRET=1.

    ``@triton.jit`` reads TRITON_INTERPRET when the module is imported; this also covers a
    module imported before the variable was set.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if kernel.fn not in _INTERPRETED:
        _INTERPRETED[kernel.fn] = InterpretedFunction(kernel.fn)
    return _INTERPRETED[kernel.fn]


def _interpret_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _launch_config(T: int, E: int, K: int) -> dict:
    """Block sizes and warps for ``T`` rows of ``E`` logits, top ``K``: the launch keywords of both kernels.

    A program holds BLOCK_T whole rows (BLOCK_E >= E columns) in registers, at most 2048 elements
    and 128 rows; tests/test_triton_compile.py compiles every configuration this returns.
    """
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(triton.next_power_of_2(T), 2048 // block_e, 128))
    return dict(BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(K),
                num_warps=4 if block_t * block_e <= 1024 else 8)


def _check_triton(logits: torch.Tensor, top_k: int) -> None:
    """Raise ValueError when the Triton kernel cannot take these logits (shape, dtype, device); static."""
    E = logits.shape[1]
    if E > MAX_EXPERTS or top_k > MAX_TOP_K:
        raise ValueError(f"logits/top_k: the Triton kernel supports E <= {MAX_EXPERTS} and top_k <= {MAX_TOP_K}, "
                         f"got E = {E}, top_k = {top_k} (use backend='torch')")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits: the Triton kernel takes fp32/fp16/bf16, got {logits.dtype} (use backend='torch')")
    if logits.device.type == "cpu" and not _interpret_enabled():
        raise ValueError("backend='triton': logits are on the CPU; Triton needs a GPU tensor, "
                         "or TRITON_INTERPRET=1 to run the interpreter on the CPU")


def _launch(logits: torch.Tensor, o: RouteOptions, out=None):
    T, E = logits.shape
    K = o.top_k
    dev = logits.device
    _check_triton(logits, K)
    if dev.type == "cpu":
        kernel = _interpreted(_route_kernel)
    else:
        kernel = _route_kernel
    if out is None:
        weights = torch.empty(T, K, dtype=torch.float32, device=dev)
        experts = torch.empty(T, K, dtype=torch.int32, device=dev)
        top1 = torch.empty(T, dtype=torch.int32, device=dev)
    else:
        weights, experts, top1 = out
        if weights.shape != (T, K) or weights.dtype != torch.float32 or experts.shape != (T, K) \
                or experts.dtype != torch.int32 or top1.shape != (T,) or top1.dtype != torch.int32:
            raise ValueError("out: expected (float32 [T, K], int32 [T, K], int32 [T]) contiguous buffers")
    dropped = torch.full((T,), -1, dtype=torch.int32, device=dev) if o.pair_table is not None and K >= 2 else None
    live = torch.empty(T, dtype=torch.int32, device=dev)
    if T == 0:
        return weights, experts, top1, RouteState(dropped, live)
    logits = logits.detach()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dummy = weights  # never read: its flag is off
    mask = o.expert_mask
    cfg = _launch_config(T, E, K)
    n_group = o.n_group or 0
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    kernel[grid](
        logits, logits.stride(0),
        o.bias if o.bias is not None else dummy,
        o.logit_boost if o.logit_boost is not None else dummy,
        o.weight_scale if o.weight_scale is not None else dummy,
        mask.view(torch.uint8) if mask is not None else dummy,
        (E if mask.dim() == 2 else 0) if mask is not None else 0,
        o.path_table.view(torch.uint8) if o.path_table is not None else dummy,
        o.prev_top1 if o.prev_top1 is not None else dummy,
        o.pair_table.view(torch.uint8) if o.pair_table is not None else dummy,
        weights, experts, top1,
        dropped if dropped is not None else dummy,
        live,
        T, o.routed_scaling,
        E=E, K=K, **cfg,
        SIGMOID=o.scoring == "sigmoid", RENORM=o.renormalize,
        HAS_BIAS=o.bias is not None, HAS_BOOST=o.logit_boost is not None, HAS_SCALE=o.weight_scale is not None,
        HAS_MASK=mask is not None, HAS_PATH=o.path_table is not None,
        HAS_PAIR=dropped is not None, ZERO_MODE=o.mask_mode == "zero",
        N_GROUP=n_group, TOPK_GROUP=o.topk_group or 0, GROUP_SIZE=E // n_group if n_group else 1,
        BLOCK_G=triton.next_power_of_2(n_group) if n_group else 1,
    )
    return weights, experts, top1, RouteState(dropped, live)


def route_forward(logits, o: RouteOptions, *, backend="triton", out=None, validate=True):
    """Launcher: validated options -> (weights [T, K] fp32, experts [T, K] int32, top1 [T] int32, state).

    Args:
        logits: [T, E] fp32/bf16/fp16 (fp64 with backend='torch').
        o: options from ``route_options`` (the same arguments as ``fused_route``).
        backend: 'triton' launches ``_route_kernel`` (grid = ceil(T / BLOCK_T), BLOCK_E =
            next_power_of_2(E)); 'torch' runs the reference forward without building a graph.
        out: optional preallocated (weights, experts, top1) buffers (triton only; tests poison them).
        validate: run the data-dependent selectability checks (host syncs; see ``fused_route``).
    Returns:
        weights, experts, top1 and the ``RouteState`` that ``route_backward`` needs.
    """
    T, E = logits.shape
    if validate:
        _check_selectable(o, T, E)
    if backend == "torch":
        with torch.no_grad():
            out4 = _route_torch(logits, o)
    else:
        out4 = _launch(logits, o, out)
    if validate:
        _check_kept_groups(logits, o, out4[3].live)
    return out4


def route_backward(grad_weights, logits, experts, state, o: RouteOptions):
    """Gradient of the weights w.r.t. the logits, with the selection held fixed.

    With ``a_k = grad_k * routed_scaling * weight_scale[e_k] * keep_k`` (keep_k = 0 for weights
    zeroed in zero mode) and ``e = experts``:

    - softmax, no renormalization (``w_k = p_{e_k}``, ``p = softmax(z)``, z with reroute masks):
      ``dz_j = p_j * ([j in e] a_j - sum_k a_k p_{e_k})``;
    - softmax, renormalized (``w_k = q_k = softmax(z_e)_k``): ``dz_{e_k} = q_k (a_k - sum_m a_m q_m)``;
    - sigmoid (``w_k = s_{e_k}`` or ``s_{e_k} / D``, ``D = sum_m s_{e_m} + 1e-20``):
      ``dL/ds_k = a_k`` or ``a_k / D - sum_m a_m s_{e_m} / D^2``, ``dx_{e_k} = dL/ds_k * s_k (1 - s_k)``.

    Ranks ``k >= state.live[t]`` (filled with a -inf score, weight 0) take no part: ``a_k = 0``
    and ``s_{e_k}`` / ``z_{e_k}`` leave the sums; NaN logits count as -inf.

    Runs ``_route_backward_kernel`` (one program per BLOCK_T rows, fp32) for fp32/bf16/fp16 logits on
    CUDA (or on the CPU under TRITON_INTERPRET=1), and the same formulas in plain torch otherwise.

    Args:
        grad_weights: [T, K]; logits: [T, E] (the forward input); experts: [T, K] int32;
        state: the ``RouteState`` from ``route_forward``; o: the forward options.
    Returns:
        grad_logits [T, E] in the logits' dtype (computed in fp32, fp64 for fp64 logits).
    """
    if logits.dtype in (torch.float32, torch.float16, torch.bfloat16) and (logits.is_cuda or _interpret_enabled()):
        return _launch_backward(grad_weights, logits, experts, state, o)
    return _route_backward_torch(grad_weights, logits, experts, state, o)


def _launch_backward(grad_weights, logits, experts, state, o: RouteOptions, out=None) -> torch.Tensor:
    """Launch ``_route_backward_kernel``: grad_logits [T, E] in the logits' dtype (into ``out`` if given)."""
    T, E = logits.shape
    K = o.top_k
    grad = torch.empty(T, E, dtype=logits.dtype, device=logits.device) if out is None else out
    if T == 0:
        return grad
    kernel = _route_backward_kernel
    if logits.device.type == "cpu":
        kernel = _interpreted(_route_backward_kernel)
    logits = logits.detach()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad_weights = grad_weights.contiguous()
    experts = experts.contiguous()
    dropped = state.dropped
    mask = o.expert_mask
    dummy = grad
    cfg = _launch_config(T, E, K)
    kernel[(triton.cdiv(T, cfg["BLOCK_T"]),)](
        grad_weights, logits, logits.stride(0), experts,
        o.logit_boost if o.logit_boost is not None else dummy,
        o.weight_scale if o.weight_scale is not None else dummy,
        mask.view(torch.uint8) if mask is not None else dummy,
        (E if mask.dim() == 2 else 0) if mask is not None else 0,
        o.path_table.view(torch.uint8) if o.path_table is not None else dummy,
        o.prev_top1 if o.prev_top1 is not None else dummy,
        dropped if dropped is not None else dummy,
        state.live, grad, T, o.routed_scaling,
        E=E, K=K, **cfg,
        SIGMOID=o.scoring == "sigmoid", RENORM=o.renormalize,
        HAS_BOOST=o.logit_boost is not None, HAS_SCALE=o.weight_scale is not None,
        HAS_MASK=mask is not None, HAS_PATH=o.path_table is not None, HAS_DROP=dropped is not None,
        ZERO_MODE=o.mask_mode == "zero",
    )
    return grad


def _route_backward_torch(grad_weights, logits, experts, state, o: RouteOptions) -> torch.Tensor:
    """``route_backward`` in plain torch (any dtype, fp64 included; used for gradcheck)."""
    T, E = logits.shape
    dropped = state.dropped
    x = logits.detach().to(_compute_dtype(logits))
    x = x.masked_fill(torch.isnan(x), float("-inf"))
    g = grad_weights.to(x.dtype)
    idx = experts.long()
    live = torch.arange(o.top_k, device=x.device)[None, :] < state.live[:, None]  # [T, K]
    a = torch.where(live, g, torch.zeros_like(g)) * o.routed_scaling
    if o.weight_scale is not None:
        a = a * o.weight_scale.to(x.dtype)[idx]
    M = _row_mask(o, T, E)
    reroute = o.mask_mode == "reroute"
    if not reroute:
        keep = torch.ones_like(a, dtype=torch.bool)
        if M is not None:
            keep = keep & ~M.gather(1, idx)
        if dropped is not None:
            keep[:, 1] &= dropped < 0
        a = a * keep
    grad = torch.zeros_like(x)
    if o.scoring == "softmax":
        z = x if o.logit_boost is None else x + o.logit_boost.to(x.dtype)
        if o.renormalize:
            z_sel = z.gather(1, idx).masked_fill(~live, float("-inf"))
            top = z_sel.amax(dim=-1, keepdim=True)
            q = torch.exp(z_sel - top.masked_fill(torch.isneginf(top), 0.0))
            q = q / q.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            grad.scatter_(1, idx, q * (a - (a * q).sum(dim=-1, keepdim=True)))
        else:
            if reroute:
                if M is not None:
                    z = z.masked_fill(M, float("-inf"))
                if dropped is not None:
                    gone = torch.zeros(T, E, dtype=torch.bool, device=x.device)
                    gone.scatter_(1, dropped.clamp(min=0).long()[:, None], (dropped >= 0)[:, None])
                    z = z.masked_fill(gone, float("-inf"))
            top = z.amax(dim=-1, keepdim=True)
            p = torch.exp(z - top.masked_fill(torch.isneginf(top), 0.0))
            p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
            grad = -p * (a * p.gather(1, idx)).sum(dim=-1, keepdim=True)
            grad.scatter_add_(1, idx, p.gather(1, idx) * a)
    else:
        s = torch.sigmoid(x.gather(1, idx)).masked_fill(~live, 0.0)
        if o.renormalize:
            D = s.sum(dim=-1, keepdim=True) + _SIGMOID_RENORM_EPS
            gs = a / D - (a * s).sum(dim=-1, keepdim=True) / D**2
        else:
            gs = a
        grad.scatter_(1, idx, gs * s * (1 - s))
    return grad.to(logits.dtype)


# ----------------------------------------------------------------------------- custom op (torch.compile)
#
# ``moetrace::route`` wraps the Triton launch so torch.compile / CUDA graphs see one opaque op
# (with a fake implementation for shapes, and the closed-form backward as its autograd formula)
# instead of tracing into the launcher. Arguments: the logits, the optional tensors of a
# ``RouteOptions`` in ``_OP_TENSORS`` order, then its scalars. No validation happens inside.

_OP_TENSORS = ("bias", "logit_boost", "weight_scale", "expert_mask", "path_table", "prev_top1", "pair_table")


def _op_args(o: RouteOptions) -> tuple:
    return (*(getattr(o, name) for name in _OP_TENSORS), o.top_k, o.renormalize, o.scoring == "sigmoid",
            o.n_group or 0, o.topk_group or 0, o.routed_scaling, o.mask_mode == "zero")


def _op_options(tensors, top_k, renormalize, sigmoid, n_group, topk_group, routed_scaling, zero_mode) -> RouteOptions:
    return RouteOptions(top_k=top_k, renormalize=renormalize, scoring="sigmoid" if sigmoid else "softmax",
                        n_group=n_group or None, topk_group=topk_group or None, routed_scaling=routed_scaling,
                        mask_mode="zero" if zero_mode else "reroute", **dict(zip(_OP_TENSORS, tensors)))


@torch.library.custom_op("moetrace::route", mutates_args=())
def _route_op(
    logits: torch.Tensor, bias: torch.Tensor | None, logit_boost: torch.Tensor | None,
    weight_scale: torch.Tensor | None, expert_mask: torch.Tensor | None, path_table: torch.Tensor | None,
    prev_top1: torch.Tensor | None, pair_table: torch.Tensor | None, top_k: int, renormalize: bool,
    sigmoid: bool, n_group: int, topk_group: int, routed_scaling: float, zero_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weights [T, K] fp32, experts [T, K] int32, top1 [T] int32, dropped, live [T] int32).

    ``dropped``: int32 [T] (-1: none) with a pair table and K >= 2, else an empty [0] tensor.
    """
    o = _op_options((bias, logit_boost, weight_scale, expert_mask, path_table, prev_top1, pair_table),
                    top_k, renormalize, sigmoid, n_group, topk_group, routed_scaling, zero_mode)
    weights, experts, top1, state = _launch(logits, o)
    dropped = state.dropped
    if dropped is None:
        dropped = torch.empty(0, dtype=torch.int32, device=logits.device)
    return weights, experts, top1, dropped, state.live


@_route_op.register_fake
def _route_op_fake(logits, bias, logit_boost, weight_scale, expert_mask, path_table, prev_top1, pair_table,
                   top_k, renormalize, sigmoid, n_group, topk_group, routed_scaling, zero_mode):
    T = logits.shape[0]
    ints = dict(dtype=torch.int32, device=logits.device)
    n_dropped = T if pair_table is not None and top_k >= 2 else 0
    return (logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, **ints),
            logits.new_empty(T, **ints), logits.new_empty(n_dropped, **ints), logits.new_empty(T, **ints))


@torch.library.custom_op("moetrace::route_backward", mutates_args=())
def _route_backward_op(
    grad_weights: torch.Tensor, logits: torch.Tensor, experts: torch.Tensor, dropped: torch.Tensor,
    live: torch.Tensor, bias: torch.Tensor | None, logit_boost: torch.Tensor | None,
    weight_scale: torch.Tensor | None, expert_mask: torch.Tensor | None, path_table: torch.Tensor | None,
    prev_top1: torch.Tensor | None, pair_table: torch.Tensor | None, top_k: int, renormalize: bool,
    sigmoid: bool, n_group: int, topk_group: int, routed_scaling: float, zero_mode: bool,
) -> torch.Tensor:
    """grad_logits [T, E] in the logits' dtype (``route_backward``)."""
    o = _op_options((bias, logit_boost, weight_scale, expert_mask, path_table, prev_top1, pair_table),
                    top_k, renormalize, sigmoid, n_group, topk_group, routed_scaling, zero_mode)
    state = RouteState(dropped if pair_table is not None and top_k >= 2 else None, live)
    return route_backward(grad_weights, logits, experts, state, o)


@_route_backward_op.register_fake
def _route_backward_op_fake(grad_weights, logits, *rest):
    return torch.empty_like(logits)


def _route_op_setup_context(ctx, inputs, output):
    logits, *tensors = inputs[:8]
    _, experts, _, dropped, live = output
    ctx.save_for_backward(logits, experts, dropped, live, *tensors)
    ctx.scalars = inputs[8:]
    ctx.mark_non_differentiable(*output[1:])


def _route_op_backward(ctx, grad_weights, *_):
    logits, experts, dropped, live, *tensors = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros(experts.shape, dtype=torch.float32, device=logits.device)
    grad = _route_backward_op(grad_weights, logits, experts, dropped, live, *tensors, *ctx.scalars)
    return (grad,) + (None,) * 14


_route_op.register_autograd(_route_op_backward, setup_context=_route_op_setup_context)


def fused_route(logits, top_k, *, renormalize=False, scoring="softmax", bias=None, n_group=None, topk_group=None,
                routed_scaling=1.0, expert_mask=None, mask_mode="reroute", path_table=None, prev_top1=None,
                pair_table=None, logit_boost=None, weight_scale=None, backend="auto", validate=True):
    """Score, intervene and select top-k in one pass (formulas: module docstring).

    Args:
        logits: [T, E] fp32/bf16/fp16 router logits, any device (E <= 512, K <= 16 for Triton).
        top_k: K experts per token.
        renormalize: divide the selected weights by their sum (Mixtral, Qwen3 norm_topk_prob,
            GPT-OSS, DeepSeek-V3 norm_topk_prob; sigmoid adds 1e-20 to the sum).
        scoring: 'softmax' (OLMoE, Qwen2/3-MoE, Mixtral, GPT-OSS) or 'sigmoid' (DeepSeek-V3).
        bias: [E] score-correction bias added to the sigmoid score for selection only.
        n_group, topk_group: group-limited selection (sigmoid): keep the topk_group best of
            n_group contiguous groups, group score = sum of its two best selection scores.
        routed_scaling: multiplies every weight after renormalization.
        expert_mask: bool [E] or [T, E], True = masked.
        mask_mode: 'reroute' (masked experts are -inf before selection) or 'zero'
            (selected as if unmasked, then weight 0).
        path_table: bool [E, E] with prev_top1 int [T]: token t masks every j with
            path_table[prev_top1[t], j]; prev_top1 < 0 = no previous layer.
        pair_table: bool [E, E]: if (first, second) of a token is a listed pair, second is masked.
        logit_boost: float [E] added to the logit (softmax) or selection score (sigmoid).
        weight_scale: float [E] multiplies each selected expert's final weight.
        backend: 'triton' (CUDA, or CPU under TRITON_INTERPRET=1; the custom op ``moetrace::route``),
            'torch' (``route_reference``), 'auto' (triton on CUDA tensors, torch otherwise).
        validate: run the data-dependent checks below (default). False skips them: no host sync and
            nothing data-dependent in Python, so the call compiles without graph breaks; for callers
            that checked their masks beforehand (``moetrace.intervene`` does, when a context is entered).
            Argument shapes, dtypes and kinds are checked either way.
    Returns:
        weights [T, K] fp32 (differentiable w.r.t. logits), experts [T, K] int32 in rank order,
        top1 [T] int32 = experts[:, 0]. Expert ids are always in [0, E); non-finite scores follow
        the module docstring (a NaN score is -inf; ranks without a finite score get weight 0).
    Raises:
        ValueError: bad argument; with ``validate``, a ``prev_top1`` >= E, or (reroute mode) masks
        that leave a row fewer than K selectable experts (K + 1 with pair rules; K in its kept groups).

    Host syncs (``validate=True``): none without interventions. An ``[E]`` expert mask / path table
    is checked once per tensor version (cached); ``prev_top1`` (range), ``[T, E]`` expert masks and
    group-limited reroute with masks or pair rules are checked on every call (one sync each).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend: expected 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "triton" if isinstance(logits, torch.Tensor) and logits.is_cuda else "torch"
    kwargs = dict(renormalize=renormalize, scoring=scoring, bias=bias, n_group=n_group, topk_group=topk_group,
                  routed_scaling=routed_scaling, expert_mask=expert_mask, mask_mode=mask_mode, path_table=path_table,
                  prev_top1=prev_top1, pair_table=pair_table, logit_boost=logit_boost, weight_scale=weight_scale)
    if backend == "torch":
        return route_reference(logits, top_k, validate=validate, **kwargs)
    o = route_options(logits, top_k, validate=validate, **kwargs)
    _check_triton(logits, top_k)
    if validate:
        _check_selectable(o, *logits.shape)
    weights, experts, top1, _, live = _route_op(logits, *_op_args(o))
    if validate:
        _check_kept_groups(logits, o, live)
    return weights, experts, top1
