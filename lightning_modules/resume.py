"""Exact resume: checkpoints that carry the random state and are written during training.

Resume = ``lightning fit ... --run_dir <run> --ckpt_path last``. For the resumed run to end where
an uninterrupted run with the same seed ends, ``last.ckpt`` carries, besides what Lightning saves
(weights, optimizers, schedulers, loop counters, the modules' ``on_save_checkpoint`` extras):

- the data position: the training loaders of our datamodules are
  :class:`datamodules.resumable.ResumableDataLoader` (Lightning saves and restores their state);
- the global random states (:class:`RandomState`): torch (CPU and CUDA), NumPy and Python.

:class:`PeriodicCheckpoint` writes ``last.ckpt`` every N training batches, so a run killed without
warning (SIGKILL, a lost node) resumes from at most N batches back. The CLI adds both to every fit
(``--checkpoint_every_n_batches``, default 100; 0 turns the periodic writes off).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["PeriodicCheckpoint", "RandomState", "get_random_state", "set_random_state"]


def get_random_state() -> dict[str, Any]:
    """The global random states of torch (CPU; CUDA when initialised), NumPy and Python.

    Returns:
        A dict of tensors and numbers only (loads with ``torch.load(weights_only=True)``):
        ``torch`` (uint8 tensor), ``cuda`` (list of uint8 tensors, one per device; empty when CUDA
        is not initialised), ``numpy`` (``keys`` int64 (624,), ``pos``, ``has_gauss``,
        ``cached_gaussian``), ``python`` (``version``, ``state`` int64 (625,), ``gauss_next``).
    """
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached),
        },
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }


def set_random_state(state: dict[str, Any]) -> None:
    """Restore the states returned by :func:`get_random_state`.

    CUDA states are restored when CUDA is available with as many devices as were saved.

    Raises:
        KeyError: ``state`` lacks one of ``torch``, ``numpy``, ``python``.
    """
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


class RandomState(pl.Callback):
    """Saves the global random states in every checkpoint; a resumed fit continues them.

    - Saved: the states at the moment the checkpoint is written (:func:`get_random_state`; rank 0's,
      which under one ``seed_everything`` seed are every rank's).
    - Restored: just before the first training batch after the resume, after Lightning's own
      bookkeeping (which may skip a validation that was due when the run stopped).
    - Validation during a fit draws on the random state but does not advance the training's: the
      state after each training batch is put back when validation ends. So training does not
      depend on when (or whether) validation runs, which a resume can change.
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None
        self._after_batch: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return get_random_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = state_dict

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._loaded is not None:
            set_random_state(self._loaded)
            self._loaded = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._after_batch = get_random_state()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._after_batch is None:
            return
        set_random_state(self._after_batch)
        self._after_batch = None


class PeriodicCheckpoint(pl.Callback):
    """Writes ``<dirpath>/last.ckpt`` after every ``every_n_batches``-th training batch.

    Counts training batches (not ``trainer.global_step``, which counts optimizer steps: 3 per batch
    in the GAR stage). The file is written atomically (Lightning's checkpoint IO), so a run killed
    while writing keeps the previous one. Works with ``ModelCheckpoint``'s own ``last.ckpt`` (at
    validation) and the run folder's (at the end of every fit): the latest write wins.

    Args:
        dirpath: the run's ``checkpoints/`` folder.
        every_n_batches: the interval in training batches (>= 1).

    Raises:
        ValueError: ``every_n_batches`` < 1.
    """

    def __init__(self, dirpath: str | Path, every_n_batches: int) -> None:
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_batches = int(every_n_batches)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.total.processed  # batches trained so far (this one too)
        if done % self.every_n_batches == 0:
            trainer.save_checkpoint(self.path)
