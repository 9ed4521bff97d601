"""Which tokens of a forward are recorded, at which position, and whether they were generated.

The one set of rules :mod:`moetrace.capture` records by and :mod:`moetrace.replay` looks routes up by,
so the two cannot drift apart. Two halves:

- :func:`forward_inputs` and :func:`mask_view` read a forward's arguments on the device, without a
  host sync (capture calls them on the forward path);
- :class:`Alignment` follows the rows of one batch on the host, forward after forward.

Rules, per batch row:

- **Padding.** A 2-D attention mask ``[B, past + S]`` (1 = token) marks it directly. A 4-D mask
  ``[B, 1, S, keys]`` (generate() with a static cache, or a model that builds its own) marks
  query ``i`` a token when it attends to its own key, ``past + i``; where the key axis is shorter
  than that (a sliding-window cache holds only the window), when it attends to any key (a
  left-padding query attends to none). The mask of full-attention layers is used when a model has
  several (a dict per attention type), else the first one. Without a mask every token counts.
- **Positions** count a row's tokens: 0, 1, ... over the tokens of the batch's forwards; a batch
  whose first forward finds tokens in the cache (``past > 0``) starts from the number of tokens
  its mask shows before them (every earlier key when the mask does not reach back).
- **Generated.** A forward over an empty cache is prompt. A forward that finds tokens in the
  cache feeds the model's own output first: with one token per row (a decode step) that token is
  generated; with several it is a new turn (transformers' "continue generation" pattern: the last
  output token, then the caller's new text): its first token is generated, the others are prompt.
- **End of sequence.** A decode step that feeds a generated EOS (one of the model's
  ``generation_config.eos_token_id``) ends its row's turn: generate() feeds a finished row EOS
  and padding while the rest of its batch goes on, and none of it is recorded (as a batch of one
  stops there). A new turn records the row again, its EOS first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple[int, int], Any]:
    """(input_ids or None, (B, S), attention mask as passed or None) of a causal LM forward."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and torch.is_tensor(args[0]):
        input_ids = args[0]
    shape = tuple(input_ids.shape if input_ids is not None else kwargs["inputs_embeds"].shape[:2])
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and torch.is_tensor(args[1]):
        mask = args[1]  # model(input_ids, attention_mask) called positionally
    return input_ids, shape, mask


def mask_view(mask: Any, S: int, past: int | torch.Tensor | None) -> dict[str, torch.Tensor] | None:
    """The attention mask reduced to what :class:`Alignment` reads, on its device (no host sync):
    ``current`` bool [B, S] (which of the forward's tokens are tokens) and ``keys`` bool [B, W] with
    ``keys_first`` (a 4-D mask's keys, earliest first: the last query's row; a 2-D mask, whose last
    S columns are the forward's tokens). None without a usable mask."""
    if isinstance(mask, dict):  # per attention type (models mixing sliding and full layers)
        mask = mask.get("full_attention", next((m for m in mask.values() if torch.is_tensor(m)), None))
    if not torch.is_tensor(mask) or mask.dim() not in (2, 4):
        return None
    if mask.dim() == 2:
        keys = mask != 0
        current = keys[:, -S:] if keys.shape[1] >= S else torch.ones(keys.shape[0], S, dtype=torch.bool,
                                                                       device=keys.device)
        return {"current": current, "keys": keys, "keys_first": False}
    m = mask[:, 0]
    m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0  # [B, S, keys]
    n_keys = m.shape[-1]
    own = torch.arange(S, device=m.device) + (0 if past is None else past)  # each query's own key
    diagonal = m.gather(2, own.clamp(max=n_keys - 1).view(1, S, 1).expand(m.shape[0], S, 1)).squeeze(2)
    current = torch.where(own < n_keys, diagonal, m.any(dim=-1))
    return {"current": current, "keys": m[:, -1, :], "keys_first": True}


@dataclass
class Step:
    """One forward's tokens [B, S]: ``valid`` (not padding), ``pos``, ``generated``, ``recorded``
    (valid and not past its row's end of sequence: what capture writes and replay forces)."""

    valid: np.ndarray
    pos: np.ndarray
    generated: np.ndarray
    recorded: np.ndarray


class Alignment:
    """The rows of one batch, followed forward after forward (module docstring for the rules)."""

    def __init__(self, rows: int, eos: np.ndarray):
        self.rows = rows
        self.eos = np.asarray(eos, dtype=np.int64).reshape(-1)
        self.count = np.zeros(rows, dtype=np.int64)   # tokens of each row so far
        self.ended = np.zeros(rows, dtype=bool)       # the row's turn ended at a generated EOS
        self.forwards = 0

    def step(self, S: int, past: int, view: dict[str, np.ndarray] | None,
             token_ids: np.ndarray | None) -> Step:
        """Align one forward of S tokens per row; ``past``: tokens the cache held before it (0 without
        one); ``view``: :func:`mask_view` on the host, or None; ``token_ids`` int [B, S] or None."""
        B = self.rows
        if past == 0:  # a forward over an empty cache starts the batch over (e.g. a training step)
            self.forwards = 0
        first = self.forwards == 0
        valid = np.ones((B, S), dtype=bool) if view is None else np.asarray(view["current"], dtype=bool)
        if first:
            self.count = self._tokens_before(past, S, view)
            self.ended[:] = False
        generated = np.zeros((B, S), dtype=bool)
        if past > 0:  # the cache holds the row's history: its first token is the model's last output
            generated[:, 0] = True
            if S > 1:
                self.ended[:] = False  # a new turn
        pos = self.count[:, None] + np.cumsum(valid, axis=1) - 1
        self.count = self.count + valid.sum(axis=1)
        ended = np.repeat(self.ended[:, None], S, axis=1)
        if past > 0 and S == 1 and len(self.eos) and token_ids is not None:
            now = valid[:, 0] & np.isin(np.asarray(token_ids).reshape(B), self.eos)
            self.ended |= now
            ended[:, 0] |= now
        self.forwards += 1
        return Step(valid=valid, pos=pos, generated=generated & valid, recorded=valid & ~ended)

    def reorder(self, beam_idx: np.ndarray) -> None:
        """Rows reordered between forwards (beam search): each row continues the history of ``beam_idx``'s."""
        self.count, self.ended = self.count[beam_idx], self.ended[beam_idx]

    def _tokens_before(self, past: int, S: int, view: dict[str, np.ndarray] | None) -> np.ndarray:
        """Tokens before a batch's first forward: the mask's over the ``past`` earlier keys (every earlier
        key the mask does not reach is a token)."""
        if past <= 0:
            return np.zeros(self.rows, dtype=np.int64)
        if view is None:
            return np.full(self.rows, past, dtype=np.int64)
        keys = np.asarray(view["keys"], dtype=bool)
        if bool(view["keys_first"]):
            seen = keys[:, :past]
        else:
            seen = keys[:, max(keys.shape[1] - S - past, 0):max(keys.shape[1] - S, 0)]
        return seen.sum(axis=1).astype(np.int64) + (past - seen.shape[1])
