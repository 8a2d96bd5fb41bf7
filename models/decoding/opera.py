"""OPERA: beam search with an over-trust penalty and retrospection-allocation (rollback), batched.

Per step, every beam takes its top ``num_candidates`` tokens; the candidates are fed in one pass (each sees the
cache and itself; Flan-T5: one pass each) and dropped from the cache again, and each one's last-layer attention
row is read out through the attention registry (max over heads, renormalised, as upstream). Over the local
window (the last prompt token and the response), the candidate's "knowledge aggregation" score is
``max_j 1e-7 * prod_{i >= j} scale * A[i, j]`` (products kept as running log-sums per column). Candidates
score ``log p - penalty_weight * score`` after the first ``warmup`` window rows and
``log p + penalty_weight * (attention on image tokens)`` before; other tokens are out.

Rollback, per sample: each beam's most frequent maximising column over its candidates is recorded per step; when
all beams of a sample agreed on the same column ``j >= warmup`` more than ``threshold`` times (within the last
``window`` steps), the sample returns to the state before token ``j + 1`` was chosen (at most ``num_candidates``
times per position, else one position earlier), its cache rows are recomputed, and token ``j + 1`` is re-chosen
from the full distribution with every earlier choice there banned. Other samples go on meanwhile.

On decoder-only models a sample's beams share one cache row (``Stream.expand(k, fold=True)``): window positions are
cache columns of that row, which differ per beam, so they are kept per beam row as before.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.backbones import _layers_of, backbone_spec
from models.decoding.attention import AttentionEdit, explicit_logits, routed
from models.decoding.search import BeamSearch, check_lengths, eos_tensor, finished_everywhere, synced_ranks
from models.decoding.settings import OPERASettings
from models.decoding.stream import Stream, prompt_image_mask, unwrap
from transformers.integrations.sdpa_attention import sdpa_attention_forward

LOG_FP16_MAX = math.log(65504.0)  # upstream stores scores in float16; larger ones are capped here, not inf
BEAM_STATE = ("length", "running", "running_scores", "seqs", "seq_len", "scores", "finished", "open")


class OperaReadout(AttentionEdit):
    """Last decoder layer: keeps the head-max, renormalised attention of the last ``rows`` queries (output: sdpa).

    ``window`` is read from self-attention (the response), ``image`` from the module holding the image keys
    (the same self-attention for decoder-only models, the cross-attention for Flan-T5)."""

    def __init__(self, targets, encoder_decoder: bool) -> None:
        super().__init__(targets)
        self.encoder_decoder = encoder_decoder
        self.rows = 1
        self.window: Tensor | None = None  # (N, R, S)
        self.image: Tensor | None = None  # (N, R) attention on image keys

    def edit(self, module, cross, query, key, value, attention_mask, kwargs):
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        b, t, s = query.shape[0], query.shape[2], key.shape[2]
        logits, _ = explicit_logits(module, query, key, attention_mask, kwargs, rows=slice(t - self.rows, t))
        attn = logits.softmax(-1).amax(dim=1)  # (N, R, S)
        attn = attn / attn.sum(-1, keepdim=True)
        if not cross:
            self.window = attn
        if cross or not self.encoder_decoder:
            self.image = (attn * self.image_keys(b, s, query.device)[:, None, :]).sum(-1)
        return out, None


def _targets(model) -> tuple[dict, bool]:
    language_model = backbone_spec(model).language_model(model)
    attns, cross = _layers_of(language_model)
    last = len(attns) - 1
    if not cross:
        return {id(attns[last]): (last, False)}, False
    self_attn = language_model.get_decoder().block[last].layer[0].SelfAttention
    return {id(self_attn): (last, False), id(attns[last]): (last, True)}, True


class Window:
    """Per row: cache positions of the window columns and ``sum_i log(scale * A[i, j])`` over recorded rows."""

    def __init__(self, rows: int, width: int, scale: float, device: torch.device) -> None:
        self.log_scale = math.log(scale)
        self.pos = torch.zeros(rows, width, dtype=torch.long, device=device)
        self.colsum = torch.zeros(rows, width, device=device)
        self.length = torch.zeros(rows, dtype=torch.long, device=device)

    def _log(self, values: Tensor) -> Tensor:
        return values.clamp_min(1e-38).log() + self.log_scale

    def append(self, attn: Tensor, position: int | Tensor, rows: Tensor | None = None) -> None:
        """Record one new window row per row: ``attn`` (n, S) over the cache; the fed token sits at ``position``
        (one column for all rows, or (n,) per row)."""
        rows = torch.arange(self.pos.shape[0], device=attn.device) if rows is None else rows
        full = self.length[rows] >= self.pos.shape[1]  # a finished sample waiting for a rolled-back one
        rows, attn = rows[~full], attn[~full]
        if torch.is_tensor(position):
            position = position[~full]
        length = self.length[rows]
        self.pos[rows, length] = position
        cols = torch.arange(self.pos.shape[1], device=attn.device)[None, :]
        values = attn.gather(1, self.pos[rows].clamp_max(attn.shape[1] - 1))
        self.colsum[rows] += torch.where(cols <= length[:, None], self._log(values), 0.0)
        self.length[rows] = length + 1

    def rebuild(self, rows: Tensor, attn: Tensor, positions: Tensor) -> None:
        """Rows ``rows`` from scratch: (n, R, S) attention of their R window rows at cache ``positions`` (R,) or,
        per row, (n, R)."""
        r = positions.shape[-1]
        positions = positions.expand(len(rows), r)
        self.pos[rows] = 0
        self.pos[rows, :r] = positions
        values = self._log(attn.gather(2, positions[:, None, :].expand(-1, r, -1)))  # (n, R rows, R cols)
        lower = torch.ones(r, r, dtype=torch.bool, device=attn.device).tril()
        self.colsum[rows] = 0
        self.colsum[rows, :r] = torch.where(lower, values, 0.0).sum(1)
        self.length[rows] = r

    def scores(self, attn: Tensor, position: int) -> Tensor:
        """(N, S+1) attention of a candidate at ``position`` -> (N, W+1) log aggregation scores (-inf = no column)."""
        width = self.pos.shape[1]
        cols = torch.arange(width + 1, device=attn.device)[None, :]
        pos = torch.cat([self.pos, self.pos.new_zeros(self.pos.shape[0], 1)], 1)
        pos.scatter_(1, self.length[:, None], position)
        values = self._log(attn.gather(1, pos))
        colsum = torch.cat([self.colsum, self.colsum.new_zeros(self.colsum.shape[0], 1)], 1)
        out = colsum + values + math.log(1e-7)
        return out.masked_fill(cols > self.length[:, None], float("-inf"))

    def reorder(self, index: Tensor) -> None:
        self.pos, self.colsum, self.length = self.pos[index], self.colsum[index], self.length[index]


def _mode(values: Tensor, dim: int) -> Tensor:
    return values.mode(dim=dim).values


class Opera:
    """One OPERA decode of a batch (the state a rollback needs lives here)."""

    def __init__(self, stream: Stream, readout: OperaReadout, settings: OPERASettings, max_new_tokens: int,
                 pad_token_id: int, eos_token_id, fold: bool = True) -> None:
        self.stream, self.readout, self.s, self.fold = stream, readout, settings, fold
        self.max_new, self.pad = max_new_tokens, pad_token_id
        self.eos = eos_token_id
        self.synced = synced_ranks(stream.model)
        if self.synced and settings.rollback:
            raise ValueError("opera.rollback recomputes a sample's cache rows on its own rank, but with ZeRO-3/FSDP-"
                             "sharded weights every rank must run the same passes: set generation.opera.rollback "
                             "false (or validate under ddp)")

    def run(self) -> Tensor:
        s, stream, readout = self.s, self.stream, self.readout
        k, c = s.num_beams, s.num_candidates
        logits = stream.prefill().logits
        batch, device = logits.shape[0], logits.device
        self.batch = batch
        self.window = Window(batch, self.max_new + 1, s.scale_factor, device)
        self.window.append(readout.window[:, -1], stream.width - 1)
        stream.expand(k, fold=self.fold)  # fold: decoder-only models keep one cache row per sample
        self.window.reorder(torch.arange(batch, device=device).repeat_interleave(k))
        logits = logits.repeat_interleave(k, dim=0)
        self.search = BeamSearch(batch, k, self.max_new, s.length_penalty, eos_tensor(self.eos, device), self.pad)
        n = batch * k
        self.history = torch.full((n, self.max_new + 1), -1, dtype=torch.long, device=device)
        self.history_len = torch.zeros(batch, dtype=torch.long, device=device)
        self.rollbacks = torch.zeros(batch, self.max_new + 2, dtype=torch.long, device=device)
        self.banned: dict[tuple[int, int], Tensor] = {}
        self.snapshots: list[dict] = []
        while True:
            scores, locs = self.candidate_scores(logits, c)
            scores = self.maybe_rollback(scores, locs)
            parent, tokens = self.search.step(scores)
            self.snapshot(parent, tokens)
            if finished_everywhere(self.search.done, self.synced, device):
                return self.search.best()
            stream.reorder(parent)
            self.window.reorder(parent)
            logits = self.step(tokens)

    def step(self, tokens: Tensor) -> Tensor:
        """Feed the beams' tokens, record their window rows; (N, V) logits. Folded beams (``Stream.expand``): the
        K tokens of a sample are the last K queries of its row, at columns ``width .. width + K - 1``."""
        stream, readout, k = self.stream, self.readout, self.stream.beams
        width = stream.width
        readout.rows = k
        try:
            logits = stream.step(tokens).logits
        finally:
            readout.rows = 1
        n = logits.shape[0]
        position = width + torch.arange(k, device=logits.device).repeat(n // k) if k > 1 else width
        self.window.append(readout.window.reshape(n, -1), position)
        return logits

    def candidate_scores(self, logits: Tensor, c: int) -> tuple[Tensor, Tensor]:
        """(N, V) beam-step scores (candidates only) and (N,) each beam's most frequent maximising column."""
        log_p = torch.log_softmax(logits, -1)
        cand = logits.topk(c, dim=-1).indices  # (N, C)
        position, n, k = self.stream.width, logits.shape[0], self.stream.beams
        best, where, image = [], [], []
        if not self.stream.encoder_decoder:  # all candidates in one pass (T5's relative positions need one each)
            self.readout.rows = k * c
            try:
                self.stream.peek_all(cand)
            finally:
                self.readout.rows = 1
            window = self.readout.window.reshape(n, c, -1)  # (N, C, S + K' * C), K' = K folded, else 1
            mass = self.readout.image.reshape(n, c)
            own = position + (torch.arange(n, device=logits.device) % k) * c  # (N,) column of candidate 0
        for i in range(c):
            if self.stream.encoder_decoder:
                self.stream.peek(cand[:, i])
                row, share = self.readout.window[:, -1], self.readout.image[:, -1]
            else:
                row = torch.cat([window[:, i, :position], window[:, i].gather(1, (own + i)[:, None])], dim=-1)
                share = mass[:, i]
            value, column = self.window.scores(row, position).max(-1)  # (N,) over the window's columns
            best.append(value)
            where.append(column)
            image.append(share)
        best, where, image = torch.stack(best, 1), torch.stack(where, 1), torch.stack(image, 1)  # (N, C)
        early = (self.window.length + 1 <= self.s.warmup)[:, None]  # window rows incl. the candidate
        penalty = torch.where(early, -image, best.clamp_max(LOG_FP16_MAX).exp())
        cand_scores = log_p.gather(1, cand) - self.s.penalty_weight * penalty
        scores = torch.full_like(log_p, float("-inf")).scatter(1, cand, cand_scores)
        return scores, _mode(where, 1)

    def snapshot(self, parent: Tensor, tokens: Tensor) -> None:
        """Keep the beam state after this step (tensors are replaced, never changed, so no copies)."""
        sr = self.search
        self.snapshots.append(dict(
            {name: getattr(sr, name) for name in BEAM_STATE},
            parent=parent.view(self.batch, -1), tokens=tokens.view(self.batch, -1)))
        if len(self.snapshots) > self.s.window + 1:
            self.snapshots.pop(0)

    def _find(self, b: int, length: int) -> dict | None:
        for snap in reversed(self.snapshots):
            if int(snap["length"][b]) == length:
                return snap
        return None

    def maybe_rollback(self, scores: Tensor, locs: Tensor) -> Tensor:
        """Record this step's columns; roll back samples whose beams keep agreeing on one (see module doc)."""
        if not self.s.rollback:
            return scores
        k = self.s.num_beams
        live = self.search.open[:, 0] & (self.search.length < self.max_new)  # (B,) samples still decoding
        rows = torch.arange(locs.shape[0], device=locs.device)
        sample_of = rows // k
        record = live[sample_of]
        self.history[rows[record], self.history_len[sample_of[record]]] = locs[record]
        self.history_len += live.long()
        per_sample = _mode(locs.view(self.batch, k), 1)  # (B,)
        span = torch.arange(self.history.shape[1], device=locs.device)[None, :]
        count = self.history_len[sample_of][:, None]
        recent = (span < count) & (span >= count - self.s.window)
        agree = ((self.history == per_sample[sample_of][:, None]) & recent).sum(1) > self.s.threshold  # (N,)
        agree = agree.view(self.batch, k).all(1) & (per_sample >= self.s.warmup) & live
        for b in agree.nonzero().flatten().tolist():
            scores = self.roll_back(b, int(per_sample[b]) + 1, scores)
        return scores

    def _refill(self, rows: Tensor, b: int, tokens: Tensor) -> tuple:
        """Recompute the cache rows of sample ``b``; (output, (K, window rows, S) attention of the window rows)."""
        readout, n = self.readout, tokens.shape[1]
        prompt_row: list[Tensor] = []
        folded = self.stream.beams > 1

        def after_prompt() -> None:
            prompt_row.append(readout.window[:, -1:])
            readout.rows = max(n * (len(rows) if folded else 1), 1)

        readout.rows = n + 1 if self.stream.encoder_decoder else 1
        try:
            out = self.stream.refill(rows, b, tokens, after_prompt)
        finally:
            readout.rows = 1
        if self.stream.encoder_decoder:
            return out, readout.window
        k = len(rows)
        first = prompt_row[0].expand(k, -1, -1) if folded else prompt_row[0]
        if n == 0:
            return out, first
        window = readout.window
        if folded:  # (1, n * K, S) step-major -> (K, n, S)
            window = window[0].view(n, k, -1).transpose(0, 1)
        first = torch.nn.functional.pad(first, (0, window.shape[-1] - first.shape[-1]))
        return out, torch.cat([first, window], dim=1)

    def roll_back(self, b: int, p: int, scores: Tensor) -> Tensor:
        """Return sample ``b`` to choosing token ``p`` again; its rows of ``scores`` become that re-choice."""
        length = int(self.search.length[b])
        if p > length or self.rollbacks[b, p] >= self.s.num_candidates:
            p -= 1
            if p < 1 or p > length or self.rollbacks[b, p] >= self.s.num_candidates:
                return scores
        before, after = self._find(b, p - 1), self._find(b, p)
        if after is None or (p > 1 and before is None):
            return scores  # outside the kept history
        self.rollbacks[b, p] += 1
        k, sr = self.s.num_beams, self.search
        if before is None:  # back to the very first choice: the beam state at the start
            fresh = BeamSearch(1, k, self.max_new, self.s.length_penalty, sr.eos, self.pad)
            before = {name: getattr(fresh, name).expand(self.batch, *getattr(fresh, name).shape[1:])
                      for name in BEAM_STATE}
        for name in BEAM_STATE:
            value = getattr(sr, name).clone()
            value[b] = before[name][b]
            setattr(sr, name, value)
        vocab = scores.shape[-1]
        ban = (after["parent"][b] - b * k) * vocab + after["tokens"][b]  # (K,) continuations chosen before
        self.banned[(b, p)] = torch.cat([self.banned.get((b, p), ban[:0]), ban])
        for key in [key for key in self.banned if key[0] == b and key[1] > p]:
            del self.banned[key]
        self.history_len[b] = p - 1
        rows = torch.arange(b * k, (b + 1) * k, device=scores.device)
        tokens = sr.running[b, :, :p - 1]
        out, attn = self._refill(rows, b, tokens)
        width, device = self.stream.width, scores.device
        prompt_last = int(self.stream.inputs["input_ids"].shape[1]) - 1
        if self.stream.encoder_decoder:
            positions = torch.arange(width - p, width, device=device)
        elif self.stream.beams > 1:  # (K, p): the prompt's last column, then beam i's column of each step
            steps = torch.arange(p - 1, device=device)[None, :] * k + torch.arange(k, device=device)[:, None]
            positions = torch.cat([torch.full((k, 1), prompt_last, device=device), prompt_last + 1 + steps], 1)
        else:
            positions = torch.arange(p, device=device) + prompt_last
        self.window.rebuild(rows, attn, positions)
        log_p = torch.log_softmax(out.logits, -1).view(-1)  # beams of sample b, flattened (K * V)
        log_p[self.banned[(b, p)]] = float("-inf")
        scores = scores.clone()
        scores[rows] = log_p.view(k, vocab)
        return scores


@torch.no_grad()
def opera(model, inputs: dict, settings: OPERASettings, *, max_new_tokens: int, pad_token_id: int,
          eos_token_id: int | list[int] | None, image_mask: Tensor | None = None) -> Tensor:
    """OPERA beam search (over-trust penalty + rollback); returns each row's best hypothesis."""
    check_lengths(max_new_tokens, pad_token_id)
    model = unwrap(model)
    targets, encoder_decoder = _targets(model)
    readout = OperaReadout(targets, encoder_decoder)
    stream = Stream(model, inputs, prompt_image_mask(model, inputs, image_mask), readout)
    with routed(model):
        return Opera(stream, readout, settings, max_new_tokens, pad_token_id, eos_token_id).run()
