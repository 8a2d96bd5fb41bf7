"""Training data loading that resumes mid-epoch: a seeded, rank-split sampler whose position Lightning checkpoints."""

from __future__ import annotations

from typing import Any, Sequence

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from datamodules.readers import load_image


class RowDataset(Dataset):
    """Rows (dicts) with their images loaded lazily."""

    def __init__(self, rows: Sequence[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = dict(self.rows[index])
        row["pixels"] = load_image(row["image"], row["reference"])
        return row


class ResumableSampler(DistributedSampler):
    """Seeded per-epoch permutation, split across ranks, that can start ``skip`` samples into the epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0
        return iter(indices[skip:])


class ResumableLoader(DataLoader):
    """Training loader whose position in the epoch is saved in Lightning checkpoints.

    Lightning stores ``state_dict()`` of stateful train loaders and calls ``load_state_dict`` on resume.
    The position is the number of batches the trainer *processed* this epoch (not the loader's own count,
    which runs ahead by the prefetched batch), so a resumed run sees exactly the batches it had not trained on.
    """

    def __init__(self, *args, trainer: Any = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trainer = trainer

    def state_dict(self) -> dict[str, int]:
        # "processed": checkpoints are saved in on_train_batch_end, after the step, before "completed" counts it
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0
        return {"epoch": int(self.sampler.epoch), "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches"] * self.batch_size
