"""Each Ray Train worker's share of the precomputed store: the same rows, in the same order, on
every run and after every restart.

Ray Train's default split (`streaming_split`) hands blocks to whichever worker asks first, so the
rows a worker trains on change from run to run (measured: two runs over one store gave different
rows to both workers, with `preserve_order` too), and a resumed run's data position ("the first n
batches of this epoch are done") points at other rows. Here the store's rows, in file-name order,
are cut into one contiguous range per worker; a worker reads only the files its range touches, in
order. Synchronous data-parallel workers consume at one rate, so the dynamic balancing given up
costs nothing. Hand-written: Ray Data has no deterministic split without materializing the data.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from ray.train import DataConfig


@dataclass(frozen=True)
class WorkerRows:
    """One worker's rows: `count` rows, starting `skip` rows into the first of `files`."""

    files: tuple[str, ...]
    skip: int
    count: int


def plan_shards(file_rows: Sequence[tuple[str, int]], world: int, batch_size: int = 1) -> list[WorkerRows]:
    """Contiguous row ranges over the files (in the given order), one per worker; sizes differ by
    at most one row. A file can be shared by neighbouring workers (a small store, many workers).
    Every worker must get at least one batch of `batch_size` rows."""
    total = sum(n for _, n in file_rows)
    if world < 1:
        raise ValueError(f"{world} workers: need at least one")
    if total == 0:
        raise ValueError(f"the store has no rows ({len(file_rows)} data files); run the precompute stage")
    if total // world < batch_size:
        raise ValueError(f"the store has {total} rows for {world} workers, {total // world} each: fewer than "
                         f"a worker's batch of {batch_size}; add data or lower distill.batch_size")
    starts = [0, *itertools.accumulate(n for _, n in file_rows)]  # row offset of each file, then the total
    bounds = [total * r // world for r in range(world + 1)]
    plan = []
    for lo, hi in zip(bounds, bounds[1:]):
        first = bisect.bisect_right(starts, lo) - 1  # the file holding row lo (never an empty one)
        last = bisect.bisect_left(starts, hi) - 1  # the file holding row hi - 1
        plan.append(WorkerRows(tuple(path for path, _ in file_rows[first:last + 1]), lo - starts[first], hi - lo))
    return plan


def plan_digest(plan: Sequence[WorkerRows], root: str = "", shuffle: tuple[int, int] = (0, 0)) -> str:
    """Names a plan and its row order (`shuffle`: window, seed) in checkpoints: a saved data
    position is valid only under the same plan and order. Files count by their path under `root`
    (the store's data folder), so a store that is moved or mounted elsewhere keeps its positions."""
    named = [{**asdict(w), "files": [f.removeprefix(root.rstrip("/") + "/") if root else f for f in w.files]}
             for w in plan]
    order = {"shuffle": list(shuffle)} if shuffle[0] else {}  # file order (window 0): the plan alone names it
    return hashlib.sha256(json.dumps({"plan": named, **order} if order else named).encode()).hexdigest()[:16]


def worker_blocks(blocks: Iterable[dict], rows: WorkerRows, start: int = 0) -> Iterator[tuple[int, dict]]:
    """The blocks (dicts of equal-length column arrays) of a worker's files -> its rows from row
    `start` of its range on, as (offset in the range of the first row, block slice). Stops
    reading once the range is done. Files that hold fewer rows than planned are an error: the
    store changed under the run."""
    skip, left, offset = rows.skip + start, rows.count - start, start
    if left <= 0:
        return
    for block in blocks:
        n = _num_rows(block)
        lo, hi = min(skip, n), min(n, skip + left)
        skip -= lo
        if hi > lo:
            yield offset, {k: v[lo:hi] for k, v in block.items()}
            offset, left = offset + hi - lo, left - (hi - lo)
            if left == 0:
                return
    raise RuntimeError(f"{', '.join(rows.files)}: {left} of the {rows.count} planned rows from row {rows.skip} "
                       "are missing; the store changed after the run listed it (restart the run to plan again)")


def shuffled_windows(blocks: Iterable[tuple[int, dict]], count: int, window: int, seed: int, epoch: int,
                     start: int = 0) -> Iterator[tuple[int, dict]]:
    """One epoch of a worker's rows, shuffled: the range's rows in file order (`blocks` as
    `worker_blocks` yields them, from the first row of the window holding row `start`) are cut
    into consecutive windows of `window` rows, and each window is permuted by a generator seeded
    with (seed, epoch, window index). Yields (offset in the shuffled epoch, block) from offset
    `start` on. So the order is the same on every run, differs between epochs, and a resume at
    any offset continues it exactly; memory holds one window. `window` 0: file order."""
    if window <= 0:
        yield from blocks
        return
    k = start // window  # the window holding `start`: the caller's blocks begin at its first row
    pending: list[dict] = []
    held = 0
    for _, block in blocks:
        n, lo = _num_rows(block), 0
        while lo < n:
            size = min(window, count - k * window)  # the last window may be shorter
            take = min(size - held, n - lo)
            pending.append({key: v[lo:lo + take] for key, v in block.items()})
            held, lo = held + take, lo + take
            if held == size:
                rows = {key: np.concatenate([piece[key] for piece in pending]) for key in pending[0]}
                order = np.random.default_rng([seed % 2**63, epoch, k]).permutation(size)  # any int seed
                skip = max(0, start - k * window)
                yield k * window + skip, {key: v[order[skip:]] for key, v in rows.items()}
                pending, held, k = [], 0, k + 1


def fixed_batches(blocks: Iterable[tuple[tuple[int, int], dict]],
                  batch_size: int) -> Iterator[tuple[tuple[int, int], dict]]:
    """Blocks tagged (epoch, offset of their first row) -> batches of exactly `batch_size` rows, in
    order; a batch may run on into the next epoch's rows, so no row is ever dropped. Each batch
    comes with the position after it: (epoch, offset) of the next row it did not take."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}: need at least 1")
    pending: list[dict] = []  # pieces of the next batch
    held = 0
    for (epoch, offset), block in blocks:
        n, lo = _num_rows(block), 0
        while lo < n:
            take = min(batch_size - held, n - lo)
            pending.append({k: v[lo:lo + take] for k, v in block.items()})
            held, lo = held + take, lo + take
            if held == batch_size:
                yield (epoch, offset + lo), {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                pending, held = [], 0


def _num_rows(block: dict) -> int:
    return len(next(iter(block.values())))


class StoreShards(DataConfig):
    """Ray Train data config: worker r's `get_dataset_shard("train")` reads `plan[r].files` in
    order (Ray's public extension point: `DataConfig.configure`). The worker then takes its
    rows with `worker_blocks` and batches them with `fixed_batches`."""

    def __init__(self, store, plan: Sequence[WorkerRows]):
        super().__init__(datasets_to_split=["train"])
        self.store, self.plan = store, list(plan)

    def configure(self, datasets, world_size: int, worker_handles, worker_node_ids, **kwargs):
        if world_size != len(self.plan):
            raise ValueError(f"the data plan has {len(self.plan)} shards for {world_size} workers")
        out = []
        for rows in self.plan:
            ds = self.store.dataset(files=list(rows.files))
            options = self.default_ingest_options()  # what Ray Train applies to a shard by default
            options.preserve_order = True  # blocks in file order, not in order of completion
            ds.context.execution_options = options
            out.append({"train": ds.iterator()})
        return out
