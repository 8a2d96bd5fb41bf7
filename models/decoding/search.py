"""Search loops shared by the methods: greedy over any scoring of the streams' outputs, and beam search.

``BeamSearch`` keeps Hugging Face's beam-search bookkeeping (transformers 5.x ``_beam_search``): top
``2 * num_beams`` continuations per sample, running beams exclude finished ones, finished hypotheses scored
``sum log p / length ** length_penalty`` (length counts generated tokens, EOS included), the default
``early_stopping=False`` heuristic, and stop at ``max_new_tokens``. Lengths are per sample, so OPERA can roll one
sample back while the others go on.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from models.decoding.stream import StepOutput, Stream

NEG = -1.0e9  # Hugging Face's "impossible" score


def eos_tensor(eos_token_id: int | list[int] | None, device: torch.device) -> Tensor:
    """(E,) end-of-sequence ids (possibly empty)."""
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def check_lengths(max_new_tokens: int, pad_token_id: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(pad_token_id, int):
        raise ValueError(f"pad_token_id must be an int (it fills rows that already ended), got {pad_token_id!r}")


def synced_ranks(model) -> bool:
    """generate()'s ``synced_gpus``: with ZeRO-3/FSDP-sharded weights every rank must run the same forward passes."""
    from transformers.distributed.fsdp import is_fsdp_managed_module
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed and (is_deepspeed_zero3_enabled() or is_fsdp_managed_module(model))


def finished_everywhere(done: bool, synced: bool, device: torch.device) -> bool:
    """``done`` here, and (synced) on every rank: until then a finished rank keeps stepping (pad tokens)."""
    if not synced:
        return done
    flag = torch.tensor(0.0 if done else 1.0, device=device)
    dist.all_reduce(flag)
    return float(flag) == 0.0


def greedy_search(
    streams: list[Stream],
    score: Callable[[list[StepOutput], int], Tensor],
    *,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | list[int] | None,
    synced: bool | None = None,
) -> Tensor:
    """Argmax of ``score(outputs of every stream, step)`` (N, V) each step; returns (N, new tokens).

    Rows that emitted EOS get ``pad_token_id`` afterwards; decoding stops when every row has ended (``synced``,
    default: under ZeRO-3/FSDP with several ranks, on every rank).
    """
    check_lengths(max_new_tokens, pad_token_id)
    synced = synced_ranks(streams[0].model) if synced is None else synced
    outs = [stream.prefill() for stream in streams]
    eos = eos_tensor(eos_token_id, outs[0].logits.device)
    unfinished = torch.ones(outs[0].logits.shape[0], dtype=torch.bool, device=eos.device)
    tokens = []
    for step in range(max_new_tokens):
        chosen = score(outs, step).argmax(dim=-1)  # (N,)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad_token_id))
        tokens.append(chosen)
        unfinished = unfinished & ~torch.isin(chosen, eos)
        if step + 1 == max_new_tokens or finished_everywhere(not bool(unfinished.any()), synced, eos.device):
            break
        outs = [stream.step(chosen) for stream in streams]
    return torch.stack(tokens, dim=1)


class BeamSearch:
    """Beams of ``batch`` samples; ``step(log_probs)`` picks the next tokens, ``best()`` the results."""

    def __init__(self, batch: int, num_beams: int, max_new_tokens: int, length_penalty: float,
                 eos: Tensor, pad_token_id: int) -> None:
        device = eos.device
        b, k, t = batch, num_beams, max_new_tokens
        self.k, self.max_new, self.length_penalty, self.eos, self.pad = k, t, length_penalty, eos, pad_token_id
        self.keep = max(2, 1 + eos.numel()) * k  # continuations considered per sample
        self.running = torch.full((b, k, t), pad_token_id, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(b, k, device=device)
        self.running_scores[:, 1:] = NEG  # only the first beam is live at the start
        self.seqs = self.running.clone()  # finished hypotheses
        self.seq_len = torch.zeros(b, k, dtype=torch.long, device=device)
        self.scores = torch.full((b, k), NEG, device=device)
        self.finished = torch.zeros(b, k, dtype=torch.bool, device=device)
        self.open = torch.ones(b, 1, dtype=torch.bool, device=device)  # finished hypotheses may still improve
        self.length = torch.zeros(b, dtype=torch.long, device=device)  # generated tokens per sample
        self.done = False

    def step(self, log_probs: Tensor) -> tuple[Tensor, Tensor]:
        """(B*K, V) per-token scores of each running beam -> (B*K,) flat parent rows and (B*K,) next tokens.

        Samples that reached ``max_new_tokens`` (OPERA: others were rolled back) keep their state.
        """
        b, k = self.running_scores.shape
        vocab = log_probs.shape[-1]
        active = self.length < self.max_new  # (B,)
        at = self.length.clamp_max(self.max_new - 1)
        total = (log_probs.view(b, k, vocab) + self.running_scores[:, :, None]).view(b, k * vocab)
        top_scores, top_index = torch.topk(total, self.keep)  # (B, 2K)
        parent, token = top_index // vocab, top_index % vocab
        seqs = self.running.gather(1, parent[..., None].expand(-1, -1, self.max_new)).clone()
        seqs.scatter_(2, at[:, None, None].expand(-1, self.keep, 1), token[..., None])
        hits = torch.isin(token, self.eos) | (self.length + 1 >= self.max_new)[:, None]  # (B, 2K)

        # running beams: the best K continuations that did not end
        running_scores = top_scores + hits.float() * NEG
        pick = torch.topk(running_scores, k).indices
        new = dict(running=seqs.gather(1, pick[..., None].expand(-1, -1, self.max_new)),
                   running_scores=running_scores.gather(1, pick))
        slot = torch.where(active[:, None], parent.gather(1, pick), torch.arange(k, device=pick.device)[None])
        flat_parent = (slot + torch.arange(b, device=pick.device)[:, None] * k).view(-1)

        # finished hypotheses: ended continuations among the top K, length-normalised, if they can still improve
        ended = hits & (torch.arange(self.keep, device=hits.device) < k)[None]
        new_len = (self.length + 1)[:, None].expand(-1, self.keep)
        normed = top_scores / (new_len.float() ** self.length_penalty)
        normed = normed + (~self.open).float() * NEG + (~ended).float() * NEG
        merged = torch.topk(torch.cat([self.scores, normed], dim=1), k).indices
        new.update(seqs=torch.cat([self.seqs, seqs], 1).gather(1, merged[..., None].expand(-1, -1, self.max_new)),
                   seq_len=torch.cat([self.seq_len, new_len], 1).gather(1, merged),
                   scores=torch.cat([self.scores, normed], 1).gather(1, merged),
                   finished=torch.cat([self.finished, ended], 1).gather(1, merged),
                   length=self.length + 1)
        for name, value in new.items():
            keep = active.view(-1, *([1] * (value.dim() - 1)))
            setattr(self, name, torch.where(keep, value, getattr(self, name)))

        best_running = self.running_scores[:, :1] / (self.length[:, None].float() ** self.length_penalty)
        worst_finished = torch.where(self.finished, self.scores.min(dim=1, keepdim=True).values, NEG)
        self.open = self.open & ((best_running > worst_finished).any(dim=-1, keepdim=True) | ~active[:, None])
        live = self.open[:, 0] & (self.length < self.max_new)
        self.done = not bool(live.any()) or bool(hits[active].all())
        tokens = self.running.gather(2, (self.length - 1).clamp_min(0)[:, None, None].expand(-1, k, 1)).view(-1)
        return flat_parent, tokens

    def best(self) -> Tensor:
        """(B, longest best hypothesis) tokens of each sample's best finished hypothesis, pad-filled."""
        width = int(self.seq_len[:, 0].max())
        out = self.seqs[:, 0, :width].clone()
        out[torch.arange(width, device=out.device)[None, :] >= self.seq_len[:, :1]] = self.pad
        return out


def beam_search(stream: Stream, num_beams: int, length_penalty: float, *, max_new_tokens: int,
                pad_token_id: int, eos_token_id: int | list[int] | None, fold: bool = True) -> Tensor:
    """Plain beam search on one stream; (B, new tokens). After the prefill the beams are folded into their
    sample's cache row (decoder-only models, ``fold``; see ``Stream.expand``), else the rows are expanded K-fold."""
    check_lengths(max_new_tokens, pad_token_id)
    logits = stream.prefill().logits
    batch = logits.shape[0]
    stream.expand(num_beams, fold=fold)
    logits = logits.repeat_interleave(num_beams, dim=0)
    search = BeamSearch(batch, num_beams, max_new_tokens, length_penalty, eos_tensor(eos_token_id, logits.device),
                        pad_token_id)
    synced = synced_ranks(stream.model)
    while True:
        parent, tokens = search.step(torch.log_softmax(logits, dim=-1))
        if finished_everywhere(search.done, synced, logits.device):
            return search.best()
        stream.reorder(parent)
        logits = stream.step(tokens).logits
