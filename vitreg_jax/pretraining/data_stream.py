"""The MAE training input stream: a fixed list of image files, reshuffled each epoch, augmented per image.

Everything is a pure function of (seed, step), so a resumed run reads exactly the batches the interrupted one
would have read, whatever the number of threads:

* epoch ``e`` visits the files in ``default_rng([seed, e]).permutation(n)``;
* optimizer step ``s`` of the run is step ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch`` and takes
  the next ``grad_accum_steps * batch_size`` files of that order (birder's ``drop_last``: the files left over
  at the end of an epoch are not used in it);
* the image at position ``p`` of epoch ``e`` is augmented with ``default_rng([seed, e, p])``.

A file that cannot be read is reported once and replaced by the next file of the epoch's order, so a run
survives a bad file and stays deterministic. Worker threads decode and augment the next steps' images while
the current step runs (PIL releases the GIL while decoding and resizing).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from vitreg_jax.data.augment import TrainTransform
from vitreg_jax.data.loader import default_workers, ordered_map
from vitreg_jax.data.preprocess import load_image
from vitreg_jax.errors import UserError

PREFETCH_STEPS = 2


class TrainData:
    """Batches for optimizer steps: ``batch(step)`` is (grad_accum_steps, local batch, H, W, 3) float32.

    ``batch_size`` is global (all processes); process ``process_index`` of ``process_count`` gets its
    contiguous slice of every micro-batch.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: TrainTransform,
        *,
        batch_size: int,
        grad_accum_steps: int = 1,
        seed: int = 0,
        workers: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        loader: Callable[[str], Image.Image] = load_image,
    ):
        self.paths = list(paths)
        self.transform = transform
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed = seed
        self.loader = loader
        if batch_size % process_count:
            raise UserError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        self.local_batch = batch_size // process_count
        self.process_index = process_index
        per_step = batch_size * grad_accum_steps
        if len(self.paths) < per_step:
            raise UserError(
                f"{len(self.paths)} images are fewer than one optimizer step needs "
                f"(batch size {batch_size} x {grad_accum_steps} accumulation steps = {per_step})"
            )
        self.steps_per_epoch = len(self.paths) // per_step
        self.workers = default_workers() if workers is None else workers
        self._orders: dict[int, np.ndarray] = {}  # the epochs in flight (at most two at an epoch boundary)
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def epoch_order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1} | {epoch: order}
        return order

    def positions(self, step: int) -> tuple[int, np.ndarray]:
        """(epoch, (grad_accum_steps, local batch) positions in that epoch's order) of an optimizer step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        a, b = self.grad_accum_steps, self.batch_size
        pos = k * a * b + np.arange(a * b).reshape(a, b)  # (A, B) global
        lo = self.process_index * self.local_batch
        return epoch, pos[:, lo : lo + self.local_batch]  # (A, B_local)

    def sample(self, epoch: int, position: int) -> np.ndarray:
        """The augmented image at ``position`` of epoch ``epoch``: (H, W, 3) float32."""
        order = self.epoch_order(epoch)
        rng = np.random.default_rng([self.seed, epoch, position])
        n = len(order)
        for attempt in range(n):
            path = self.paths[order[(position + attempt) % n]]
            try:
                return self.transform(self.loader(path), rng)
            except UserError as e:
                if path not in self._reported:
                    self._reported.add(path)
                    reason = getattr(e, "reason", e)  # ImageReadError names the path itself
                    print(f"vitreg-jax pretrain: warning: skipping {path}: {reason}", file=sys.stderr)
        raise UserError("none of the training images could be read")

    def batch(self, step: int) -> np.ndarray:
        epoch, pos = self.positions(step)
        items = [self.sample(epoch, int(p)) for p in pos.reshape(-1)]
        return np.stack(items).reshape(*pos.shape, *items[0].shape)

    def iterate(self, start: int, stop: int) -> Iterator[tuple[int, np.ndarray]]:
        """(step, batch) for steps start..stop-1, prepared ``PREFETCH_STEPS`` steps ahead in worker threads
        (the data pipeline's ordered map: in order, at most that many steps' images in flight)."""

        def jobs() -> Iterator[tuple[int, tuple[int, ...], int, int]]:  # (step, batch shape, epoch, position)
            for step in range(start, stop):
                epoch, pos = self.positions(step)
                self.epoch_order(epoch)  # computed here, not by the threads
                for p in pos.reshape(-1):
                    yield step, pos.shape, epoch, int(p)

        per_step = self.grad_accum_steps * self.local_batch
        items: list[np.ndarray] = []
        done = ordered_map(
            jobs(), lambda job: self.sample(job[2], job[3]), self.workers, PREFETCH_STEPS * per_step
        )
        for (step, shape, _, _), item in done:
            items.append(item)
            if len(items) == per_step:
                yield step, np.stack(items).reshape(*shape, *item.shape)  # (accum, local batch, H, W, 3)
                items = []
