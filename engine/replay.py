"""Routing replay: force a recorded trace's routes in a forward pass (R3-style "router replay").

    with replay(model, "rollout.zarr") as rp:
        rp.set_batch(seq=[3, 7])
        out = model(input_ids=ids, attention_mask=mask)    # or model.generate(...), or a training step
        rp.replay_rate()                                    # {layer_id: share of tokens re-routed}

Every MoE layer routes each non-padding token to the top-k experts the store recorded for it,
aligned by (``seq``, ``pos``): batch row ``b`` is sequence ``seq[b]`` and a token's ``pos`` counts
the non-padding tokens of its row so far, exactly as ``moetrace.capture`` records it (so a decode
step's token at position ``p`` uses the routes recorded at ``p``). Padding tokens keep the live
routing. The weights are the live router scores gathered at the forced experts and normalized as
the family does (``RouteSpec``): softmax families ``p = softmax(logits)``, ``w = p[ids]``, divided
by their sum when the family renormalizes; sigmoid families ``w = sigmoid(logits)[ids]``, divided by
``sum + 1e-20`` when it renormalizes; then times ``routed_scaling``. So gradients reach the router
through the weights, as in Megatron-LM's router replay. A selection bias only ever chose experts,
so it plays no part once the experts are given.

Replay rate. Per MoE layer, the share of replayed tokens whose live top-k set (what the router
would have chosen, under any enclosing intervention) differs from the replayed set, as prime-rl
logs it: ``rp.replay_rate()`` -> ``{layer_id: float}`` over the forwards since the context was
entered (or since ``replay_rate(reset=True)``); NaN for a layer with no replayed token yet.

Errors (``MoetraceError``, raised by ``replay``, ``set_batch`` or the pre-hook before the model
computes anything; the last one by the first router): a store whose layers, experts or top-k are
not the model's; a ``seq`` id the store lacks; ``set_batch`` ids not one per batch row; a token
whose position the store does not hold for its sequence; a recorded token id that differs from
the input's (with ``check_tokens``, the default; where the store knows token ids); a recorded
expert id outside ``[0, E)``; a forward without a prepared batch (e.g. ``model.model(...)`` called
directly, which the hook on ``model`` does not see).

Generation. Tokens are aligned by the rules capture records by (:mod:`moetrace.alignment`, one
function for both): a row's turn ends at the decode step that feeds its generated EOS, and while
``generate`` feeds a finished row EOS and padding as the batch goes on, those tokens keep the live
routing (capture does not record them) and are left out of the replay rate; a new turn (a
continuation of several tokens) is replayed again. Beam search (rows reordered between steps) is
not supported: ``set_batch`` takes one id per batch row.

Cost. The lookup runs on the host in a forward pre-hook on ``model``: it reads the attention
mask and input ids (a device-to-host sync per forward) and copies the forced ids ``[L, T, K]`` to
the device. This is a training/replay path, not an intervention on a compiled serving hot path;
the router side (gather, normalize, count) is plain torch ops without host syncs or
data-dependent Python. Under ``torch.compile`` the pre-hook runs outside the graph
(``torch.compiler.disable``) and the routers compile without a graph break (tested with the
``aot_eager`` backend). Memory: the host keeps one batch's recorded experts as a dense int16 table
[rows, positions, L, K] (int32 beyond 32767 experts); each forward copies its [L, T, K] slice to
the device.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from moetrace.alignment import Alignment, forward_inputs, mask_view
from moetrace.capture import cache_length, find_cache
from moetrace.compare import read_rows, sequence_index
from moetrace.errors import MoetraceError
from moetrace.intervene import patch_routers, router_sites
from moetrace.models import RouterSite, RouteSpec
from moetrace.store import TraceStore

__all__ = ["Replay", "replay", "replay_weights"]

_SIGMOID_RENORM_EPS = 1e-20  # as moetrace.kernels.routing (transformers DeepseekV3TopkRouter)


def replay_weights(logits: torch.Tensor, experts: torch.Tensor, spec: RouteSpec) -> torch.Tensor:
    """Routing weights [T, K] of the given ``experts`` [T, K] from ``logits`` [T, E], as the family
    normalizes them (fp32; fp64 for fp64 logits); differentiable w.r.t. ``logits``."""
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    ids = experts.long()
    if spec.scoring == "softmax":
        w = torch.softmax(x, dim=-1).gather(1, ids)
        if spec.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
    else:
        w = torch.sigmoid(x).gather(1, ids)
        if spec.renormalize:
            w = w / (w.sum(dim=-1, keepdim=True) + _SIGMOID_RENORM_EPS)
    return w * spec.routed_scaling


class Replay:
    """The object ``replay(...)`` yields; call :meth:`set_batch` before each batch."""

    def __init__(self, model: nn.Module, store: TraceStore, check_tokens: bool):
        self.model = model
        self.store = store
        self.check_tokens = check_tokens
        self.sites: list[RouterSite] = router_sites(model)
        spec = self.sites[0].spec
        self._E, self._K = spec.n_experts, spec.top_k
        expected = (len(self.sites), spec.n_experts, spec.top_k, [s.layer_id for s in self.sites])
        got = (store.n_layers, store.n_experts, store.top_k, store.layer_ids.tolist())
        if expected != got:
            raise MoetraceError(f"{store.path}: store has (layers, experts, top_k, layer_ids) = {got}, "
                                f"the model routes with {expected}")
        self._index = sequence_index(store)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self._eos = np.asarray([] if eos is None else eos, dtype=np.int64).reshape(-1)
        self._batch: dict[str, np.ndarray] | None = None
        self._ids_dtype = np.int16 if self._E <= np.iinfo(np.int16).max else np.int32
        self._forced: torch.Tensor | None = None   # int16/int32 [L, T, K] for the running forward (-1: live)
        self._use: torch.Tensor | None = None      # bool [T]: tokens replayed
        self._differ: torch.Tensor | None = None   # per MoE layer position: tokens re-routed
        self._replayed: torch.Tensor | None = None  # tokens replayed (same for every layer)

    # ------------------------------------------------------------------ user API
    def set_batch(self, seq: Sequence[int] | np.ndarray) -> None:
        """The sequence id of each batch row of the next forward and the decode steps that continue it.

        Reads those sequences' rows (positions, experts, token ids) from the store. Raises
        MoetraceError for an id the store lacks, repeated positions or an expert id outside [0, E).
        """
        ids = np.asarray(seq, dtype=np.int64).reshape(-1)
        if not len(ids):
            raise MoetraceError("replay.set_batch: expected one sequence id per batch row, got none")
        known, starts, lengths = self._index
        at = np.searchsorted(known, ids)
        at_ok = np.minimum(at, max(len(known) - 1, 0))
        missing = (at >= len(known)) | (known[at_ok] != ids) if len(known) else np.ones(len(ids), dtype=bool)
        if missing.any():
            raise MoetraceError(f"replay.set_batch: sequence {int(ids[missing][0])} has no rows in {self.store.path}; "
                                f"expected ids the store holds ({len(known)} sequences)")
        starts, lengths = starts[at], lengths[at]
        rows = read_rows(self.store, ["pos", "token_id", "experts"], starts, lengths)
        row_of = np.repeat(np.arange(len(ids)), lengths)
        pos = rows["pos"].astype(np.int64)
        experts = rows["experts"].astype(np.int64)
        bad = (experts < 0) | (experts >= self._E)
        if bad.any():
            r, layer, _ = np.argwhere(bad)[0]
            raise MoetraceError(
                f"{self.store.path}: routing/experts of sequence {int(ids[row_of[r]])} position {int(pos[r])} "
                f"layer {int(self.store.layer_ids[layer])}: expected expert ids in [0, {self._E}), "
                f"got {int(experts[r, layer][bad[r, layer]][0])}")
        width = int(pos.max()) + 1 if len(pos) else 0
        if len(pos) and pos.min() < 0:
            raise MoetraceError(f"{self.store.path}: tokens/pos: expected positions >= 0, got {int(pos.min())}")
        flat = row_of * width + pos
        if len(np.unique(flat)) != len(flat):
            raise MoetraceError(f"{self.store.path}: tokens/pos: expected each position once per sequence, "
                                f"got repeated positions in one of the sequences {ids.tolist()}")
        table = np.full((len(ids), width, self.store.n_layers, self._K), -1, dtype=self._ids_dtype)
        table[row_of, pos] = experts
        tokens = np.full((len(ids), width), -1, dtype=np.int64)
        tokens[row_of, pos] = rows["token_id"]
        end = np.zeros(len(ids), dtype=np.int64)  # one past each sequence's largest recorded position
        np.maximum.at(end, row_of, pos + 1)
        self._batch = {"seq": ids, "table": table, "tokens": tokens, "length": lengths, "end": end,
                       "alignment": Alignment(len(ids), self._eos)}

    def replay_rate(self, reset: bool = False) -> dict[int, float]:
        """{layer_id: share of the replayed tokens whose live top-k set differs from the replayed one}
        over the forwards since entering (or the last reset); NaN before any replayed token."""
        if self._differ is None:
            out = {s.layer_id: math.nan for s in self.sites}
        else:
            n = int(self._replayed.item())
            differ = self._differ.cpu().tolist()
            out = {s.layer_id: (differ[s.position] / n if n else math.nan) for s in self.sites}
        if reset:
            self._differ = self._replayed = None
        return out

    # ------------------------------------------------------------------ hooks
    @torch.compiler.disable
    def before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Host-side lookup of this forward's forced experts (forward pre-hook on the model; the one
        place replay leaves a compiled graph, ``torch.compiler.disable``)."""
        batch = self._batch
        if batch is None:
            raise MoetraceError("replay: expected rp.set_batch(seq=[...]) before the forward, got none")
        input_ids, (B, S), mask = forward_inputs(args, kwargs)
        n = len(batch["seq"])
        if B != n:
            raise MoetraceError(f"replay.set_batch: expected {B} sequence ids for a batch of {B} rows "
                                f"(one per row), got {n}")
        past = cache_length(find_cache(args, kwargs))
        view = mask_view(mask, S, past)
        view = None if view is None else {k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in view.items()}
        if past is None:  # no cache: a 2-D mask wider than the tokens covers earlier ones
            past = view["keys"].shape[1] - S if view is not None and not view["keys_first"] else 0
        past = max(int(past), 0)
        tokens = None if input_ids is None else input_ids.detach().cpu().numpy().astype(np.int64)
        # capture's rules (moetrace.alignment): tokens it would not record (padding, a row past its
        # generated EOS) keep the live routing
        step = batch["alignment"].step(S, past, view, tokens)
        pos, use = step.pos, step.recorded
        width = batch["table"].shape[1]
        inside = np.minimum(pos, max(width - 1, 0))
        rows = np.arange(B)[:, None]
        forced = batch["table"][rows, inside] if width else np.full((B, S, len(self.sites), self._K), -1,
                                                                     dtype=self._ids_dtype)
        lacking = use & ((pos >= width) | (forced[..., 0, 0] < 0))
        if lacking.any():
            b, s = np.argwhere(lacking)[0]
            raise MoetraceError(
                f"replay: sequence {int(batch['seq'][b])} position {int(pos[b, s])}: no recorded routes in "
                f"{self.store.path} (it holds {int(batch['length'][b])} positions, up to {int(batch['end'][b]) - 1}); "
                f"expected the batch's tokens to be ones the trace recorded")
        if self.check_tokens and tokens is not None:
            recorded = batch["tokens"][rows, inside] if width else np.full((B, S), -1)
            wrong = use & (recorded >= 0) & (recorded != tokens)
            if wrong.any():
                b, s = np.argwhere(wrong)[0]
                raise MoetraceError(
                    f"replay: sequence {int(batch['seq'][b])} position {int(pos[b, s])}: expected the recorded "
                    f"token id {int(recorded[b, s])}, got {int(tokens[b, s])} (check_tokens=False skips this check)")
        device = self.sites[0].module.weight.device
        forced = np.where(use[..., None, None], forced, -1).reshape(B * S, len(self.sites), self._K)
        self._forced = torch.from_numpy(np.ascontiguousarray(forced.transpose(1, 0, 2))).to(device)
        self._use = torch.from_numpy(use.reshape(-1)).to(device)

    def after_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._forced = self._use = None

    def route(self, site: RouterSite, logits: torch.Tensor, weights: torch.Tensor,
              experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing override: the forced experts with the live scores' weights; counts re-routed tokens."""
        if self._forced is None:
            raise MoetraceError(f"replay: router {site.name!r} ran outside a forward of the replayed model "
                                f"{type(self.model).__name__}; call the model itself after rp.set_batch(...)")
        forced = self._forced[site.position].to(logits.device, torch.int64)
        if forced.shape[0] != logits.shape[0]:
            raise MoetraceError(f"replay: router {site.name!r}: expected {forced.shape[0]} tokens as prepared for "
                                f"this forward, got {logits.shape[0]}")
        use = self._use.to(logits.device)
        live = experts.long()
        ids = torch.where(use[:, None], forced, live)
        w = torch.where(use[:, None], replay_weights(logits, ids, site.spec).to(weights.dtype), weights)
        differ = ((ids.sort(dim=-1).values != live.sort(dim=-1).values).any(dim=-1) & use).sum()
        if self._differ is None:
            self._differ = torch.zeros(len(self.sites), dtype=torch.int64, device=logits.device)
            self._replayed = torch.zeros((), dtype=torch.int64, device=logits.device)
        self._differ[site.position] += differ.detach().to(self._differ.device)
        if site.position == 0:
            self._replayed += use.sum().to(self._replayed.device)
        return w, ids.to(torch.int32)


@contextmanager
def replay(
    model: nn.Module,
    store: TraceStore | str | Path,
    *,
    check_tokens: bool = True,
    backend: str = "auto",
) -> Iterator[Replay]:
    """Context manager forcing the routes recorded in ``store`` on every forward of ``model``.

    Args:
        model: a transformers MoE model of a supported family (``moetrace.models``).
        store: a trace of the same layers, experts and top-k (a TraceStore or a path).
        check_tokens: require each token id to equal the recorded one where the store has it.
        backend: ``fused_route`` backend of the live routing (for the replay rate).
    Yields a :class:`Replay`; see the module docstring. Composes with ``capture`` (opened inside
    it): capture records exactly the replayed routes.
    """
    opened = store if isinstance(store, TraceStore) else TraceStore.open(store)
    rp = Replay(model, opened, check_tokens)
    pre = model.register_forward_pre_hook(rp.before_forward, with_kwargs=True)
    post = model.register_forward_hook(rp.after_forward, with_kwargs=True)
    try:
        with patch_routers(model, None, override=rp.route, backend=backend):
            yield rp
    finally:
        pre.remove()
        post.remove()
