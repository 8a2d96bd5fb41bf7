"""Decoding under sharded weights (ZeRO-3/FSDP): ranks whose rows end at different steps keep stepping together."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.decoding.search import greedy_search
from models.decoding.stream import Stream, prompt_image_mask
from models.tiny import PAD_TOKEN_ID, tiny_inputs, tiny_llava

NEW = 6


def _decode(rank: int, synced: bool, eos: list[int] | None) -> tuple[list, int]:
    torch.manual_seed(0)
    model = tiny_llava().eval()
    inputs = tiny_inputs(model, batch=2, seed=rank)
    stream = Stream(model, inputs, prompt_image_mask(model, inputs))
    calls = []
    model.register_forward_pre_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = greedy_search([stream], lambda outs, step: outs[0].logits, max_new_tokens=NEW,
                            pad_token_id=PAD_TOKEN_ID, eos_token_id=eos, synced=synced)
    return out.tolist(), len(calls)


def _worker(rank: int, port: int, out_dir: str, eos: list[int]) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        tokens, calls = _decode(rank, synced=True, eos=eos if rank == 0 else None)  # rank 0 ends early
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"tokens": tokens, "calls": calls}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about a minute on a loaded 2-core machine
def test_ranks_step_together_until_all_rows_everywhere_ended(tmp_path: Path) -> None:
    first, _ = _decode(0, synced=False, eos=None)
    eos = [first[0][1], first[1][1]]  # both rows of rank 0 end at step 1
    alone, alone_calls = _decode(0, synced=False, eos=eos)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp_path), eos), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["calls"] == ranks[1]["calls"] == NEW  # the same forward passes on both ranks
    assert alone_calls < NEW, "rank 0 alone must stop early, or the test is blind"
    width = len(alone[0])
    for synced_row, own_row in zip(ranks[0]["tokens"], alone):
        assert synced_row[:width] == own_row and set(synced_row[width:]) <= {PAD_TOKEN_ID}
