"""A worker's training data: its rows of the store, epoch after epoch in seeded windows
(`worker_batches`), where it stands in them (`DataStream`, saved in checkpoints), and where a resume
starts (`data_position`)."""

from __future__ import annotations

import time
from collections.abc import Iterator

# A worker whose rows take less than this keeps them in memory after its first pass: each pass over
# a Ray Data shard starts a streaming execution (tasks scheduled, files opened again), which a small
# store would pay every epoch, i.e. every few steps. Larger stores stream every epoch.
CACHE_BYTES = 512 * 2**20


def worker_batches(shard, rows, store, batch_size: int, epoch: int, done: int, window: int, seed: int,
             cache_bytes: int = CACHE_BYTES):
    """Endless ((epoch, rows of it done), decoded batch) over this worker's `rows` (a
    `pipelines.sharding.WorkerRows`), epoch after epoch, each epoch shuffled in windows of
    `window` rows (`shuffled_windows`), from row `done` of `epoch` (a resume reads on from there).
    The shard is read once if its blocks up to the range's end take under `cache_bytes`."""
    from pipelines.sharding import fixed_batches, shuffled_windows, worker_blocks

    kept: list[dict] | None = None  # the shard's blocks up to the end of this worker's range
    fits = True  # false once a pass outgrew cache_bytes: later passes stream without measuring

    def read():
        nonlocal kept, fits
        if kept is not None:
            yield from kept
            return
        seen, size = [], 0
        for block in shard.iter_batches(batch_size=None, batch_format="numpy"):  # Ray Data's blocks, cut below
            if fits:
                size += sum(_nbytes(v) for v in block.values())
                fits = size <= cache_bytes
                if fits:
                    seen.append(block)
                    kept = seen  # worker_blocks stops asking at the range's end: what it saw is all it needs
                else:
                    seen, kept = [], None
            yield block

    def blocks():
        e, start = epoch, done
        while True:
            if start >= rows.count:  # a position at the end of an epoch: the next one starts
                e, start = e + 1, 0
            first = start - start % window if window else start  # a resume re-reads its window
            for offset, block in shuffled_windows(worker_blocks(read(), rows, first),
                                                  rows.count, window, seed, e, start):
                yield (e, offset), block
            e, start = e + 1, 0

    for position, batch in fixed_batches(blocks(), batch_size):
        yield position, store.decode(batch)


def _nbytes(column) -> int:
    """Bytes a block's column holds. The store's tensors and captions arrive as numpy object arrays
    of bytes / str (Ray Data's binary and string columns), whose own nbytes counts only pointers."""
    # a numpy dtype equals `object` for object arrays (`is` would never hold)
    if getattr(column, "dtype", None) == object:  # noqa: E721
        return sum(len(x) for x in column if isinstance(x, (bytes, str)))
    return getattr(column, "nbytes", 0)


def data_position(state: dict, digest: str, rank: int) -> tuple[int, int, str | None]:
    """(epoch, rows of it done) for this rank from a checkpoint's state, and a note when the
    position cannot be kept: it is valid only for the same store files and worker count."""
    if state.get("data_plan") == digest:
        epoch, done = state["data_positions"][rank]
        return epoch, done, None
    why = ("the checkpoint holds no per-worker data positions" if "data_plan" not in state
           else "the data plan changed since the checkpoint (the store's files, the number of workers, "
                "distill.shuffle_window or distill.seed)")
    return state["epoch"] + 1, 0, f"{why}: data restarts at a new epoch"


class DataStream:
    """This worker's batches on its device, and its place in its rows: `epoch` and `rows_done`
    (rows of that epoch consumed), as of the last batch taken. `data_wait` adds up the seconds
    spent waiting for batches since it was last set to 0: it shows when training is input-bound."""

    def __init__(self, batches: Iterator, epoch: int, rows_done: int, device, dtype, scales):
        self._batches = batches  # as `worker_batches` yields them
        self.epoch, self.rows_done = epoch, rows_done
        self.data_wait = 0.0
        self._device, self._dtype, self._scales = device, dtype, scales

    def next_batch(self):
        """(text embeddings, {scale: latents}) of the next batch, on the device."""
        from swd_core.adapters import TextEmbeddings

        start = time.perf_counter()
        (self.epoch, self.rows_done), batch = next(self._batches)
        self.data_wait += time.perf_counter() - start
        text = TextEmbeddings(batch["prompt_embeds"], batch["pooled_prompt_embeds"]).to(self._device, self._dtype)
        latents = {s: batch[f"latents_{s}"].to(self._device) for s in set(self._scales)}
        return text, latents
