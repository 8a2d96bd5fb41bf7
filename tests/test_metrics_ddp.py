"""Metrics under 2-process DDP (gloo, CPU) equal one process; CHAIR/POPE inside Lightning validation."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from metrics.amber import AMBER, AmberAnnotations
from metrics.chair import CHAIR
from metrics.mme import MME
from metrics.pope import POPE
from tests.test_metrics_chair import CAPS, GT, IDS
from tests.test_metrics_pope import CASES

CHAIR_CAPS = CAPS * 3 + ["A dog chases a cat past a bench and a toilet seat."]
CHAIR_IDS = IDS * 3 + [2]
POPE_ANSWERS, POPE_LABELS = [c[0] for c in CASES], [c[1] for c in CASES]
MME_ROWS = [("existence", "a", "yes", "Yes"), ("count", "b", "no", "No"), ("existence", "a", "no", "Yes"),
            ("count", "b", "yes", "Yes"), ("OCR", "c", "yes", "yes"), ("OCR", "c", "no", "no"),
            ("code_reasoning", "d", "yes", "no"), ("code_reasoning", "d", "no", "no")]
AMBER_ANN = AmberAnnotations({1: ("dog", "grass"), 2: ("car",)}, {1: ("cat",), 2: ("person",)},
                             {"dog": ("puppy",), "grass": ("lawn",), "cat": ("kitten",), "car": (), "person": ("man",)},
                             frozenset())
AMBER_ROWS = [(1, "A puppy and a kitten."), (2, "A car and a man."), (1, "A dog on the lawn."), (2, "A man.")]


def _metrics() -> dict:
    return {"chair": CHAIR(GT, return_details=True), "pope": POPE(), "mme": MME(), "amber": AMBER(AMBER_ANN)}


def _update(metrics: dict, part: slice) -> None:
    metrics["chair"].update(CHAIR_CAPS[part], CHAIR_IDS[part])
    metrics["pope"].update(POPE_ANSWERS[part], POPE_LABELS[part])
    rows = MME_ROWS[part]
    metrics["mme"].update([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    rows = AMBER_ROWS[part]
    metrics["amber"].update([r[0] for r in rows], [r[1] for r in rows])


def _results(metrics: dict) -> dict:
    out = {name: {k: v.item() for k, v in m.compute().items()} for name, m in metrics.items()}
    out["chair_details"] = metrics["chair"].details()
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metrics = _metrics()
        # Uneven shards; rank 1 splits an MME image's two questions with rank 0 (acc+ must still see both).
        _update(metrics, slice(0, 5) if rank == 0 else slice(5, None))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(_results(metrics)))
        # A process that sees no data at all must still take part in the gathers.
        idle = _metrics()
        if rank == 0:
            _update(idle, slice(0, None))
        Path(out_dir, f"idle{rank}.json").write_text(json.dumps(_results(idle)))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = _metrics()
    _update(single, slice(0, None))
    expected = _results(single)
    for rank, kind in [(0, "rank"), (1, "rank"), (0, "idle"), (1, "idle")]:
        got = json.loads((tmp_path / f"{kind}{rank}.json").read_text())
        for name in ("chair", "pope", "mme", "amber"):
            assert got[name] == pytest.approx(expected[name], abs=1e-12), (rank, name)
        # details are gathered rank 0 first, then rank 1: the same order as the single process here
        assert got["chair_details"] == expected["chair_details"]


class CaptionScorer(pl.LightningModule):
    """A LightningModule that 'generates' captions and answers (from the batch) and scores them."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.chair = CHAIR(GT)
        self.pope = POPE()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.chair.update(batch["caption"], batch["image_id"])
        self.pope.update(batch["answer"], batch["label"])

    def on_validation_epoch_end(self) -> None:
        for name, value in {**self.chair.compute(), **{f"pope_{k}": v for k, v in self.pope.compute().items()}}.items():
            self.log(name, value.float())
        self.chair.reset()
        self.pope.reset()


def test_inside_lightning_validation() -> None:
    rows = [{"caption": c, "image_id": i, "answer": a, "label": lab}
            for c, i, a, lab in zip(CHAIR_CAPS, CHAIR_IDS, POPE_ANSWERS, POPE_LABELS)]
    loader = torch.utils.data.DataLoader(rows, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.validate(CaptionScorer(), loader, verbose=False)
    expected_chair = CHAIR(GT)
    expected_chair.update([r["caption"] for r in rows], [r["image_id"] for r in rows])
    expected_pope = POPE()
    expected_pope.update([r["answer"] for r in rows], [r["label"] for r in rows])
    for key, value in expected_chair.compute().items():
        assert logged[key] == pytest.approx(value.item(), rel=1e-6)
    assert logged["pope_f1"] == pytest.approx(expected_pope.compute()["f1"].item(), rel=1e-6)
