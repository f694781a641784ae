"""Each Ray Train worker's rows of the store: a fixed contiguous range, read in order."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sharding import (
    StoreShards,
    WorkerRows,
    fixed_batches,
    plan_digest,
    plan_shards,
    shuffled_windows,
    worker_blocks,
)


def test_plan_gives_contiguous_ranges_that_cover_every_row_once():
    # rows 0-4 in a, none in b, 5-11 in c, 12-14 in d; 15 rows over 4 workers: bounds 0 3 7 11 15
    plan = plan_shards([("a", 5), ("b", 0), ("c", 7), ("d", 3)], world=4)
    assert plan == [
        WorkerRows(("a",), 0, 3),             # a[0:3]
        WorkerRows(("a", "b", "c"), 3, 4),    # a[3:5] + c[0:2]
        WorkerRows(("c",), 2, 4),             # c[2:6]
        WorkerRows(("c", "d"), 6, 4),         # c[6:7] + d[0:3]
    ]


def test_plan_shares_one_file_among_more_workers_than_files():
    assert plan_shards([("a", 4)], world=3) == [WorkerRows(("a",), 0, 1), WorkerRows(("a",), 1, 1),
                                                WorkerRows(("a",), 2, 2)]


def test_plan_refuses_a_store_that_cannot_give_every_worker_a_batch():
    with pytest.raises(ValueError, match="3 rows for 4 workers, 0 each"):
        plan_shards([("a", 2), ("b", 1)], world=4)
    with pytest.raises(ValueError, match="7 rows for 2 workers, 3 each: fewer than a worker's batch of 4"):
        plan_shards([("a", 7)], world=2, batch_size=4)
    assert [w.count for w in plan_shards([("a", 8)], world=2, batch_size=4)] == [4, 4]
    with pytest.raises(ValueError, match="no rows .2 data files.; run the precompute stage"):
        plan_shards([("a", 0), ("b", 0)], world=1)


def test_plan_digest_names_the_plan():
    plan = plan_shards([("a", 5), ("b", 7)], world=2)
    assert plan_digest(plan) == plan_digest(plan_shards([("a", 5), ("b", 7)], world=2))
    assert plan_digest(plan) != plan_digest(plan_shards([("a", 5), ("b", 8)], world=2))  # the store grew
    assert plan_digest(plan) != plan_digest(plan_shards([("a", 5), ("b", 7)], world=3))
    # the same store at another place: positions stay valid; another store's files do not
    here, there = (plan_shards([(f"{root}/data/{n}", 6) for n in "ab"], world=2) for root in ("/runs/x", "bucket/y"))
    assert plan_digest(here, "/runs/x/data") == plan_digest(there, "bucket/y/data")
    assert plan_digest(here) != plan_digest(there)
    assert plan_digest(here, "/runs/x/data") != plan_digest(plan_shards([("/runs/x/data/c", 6), ("/runs/x/data/b", 6)],
                                                                        world=2), "/runs/x/data")


def _blocks(sizes, start=0):
    """Column blocks of the given sizes holding consecutive ids from `start`."""
    out = []
    for n in sizes:
        ids = np.arange(start, start + n)
        out.append({"id": ids, "name": np.array([f"r{i}" for i in ids], dtype=object)})
        start += n
    return out


def test_worker_blocks_cut_the_range_out_of_its_files():
    # blocks of 3, 0, 5 and 2 rows holding 0..9; the range is rows [2, 9): 7 rows
    rows = WorkerRows(("f",), skip=2, count=7)
    got = [(offset, b["id"].tolist()) for offset, b in worker_blocks(_blocks([3, 0, 5, 2]), rows)]
    assert got == [(0, [2]), (1, [3, 4, 5, 6, 7]), (6, [8])]
    # from row 4 of the range on (a resume): rows 6..8, offsets counted in the range
    got = [(offset, b["id"].tolist()) for offset, b in worker_blocks(_blocks([3, 0, 5, 2]), rows, start=4)]
    assert got == [(4, [6, 7]), (6, [8])]
    assert list(worker_blocks(_blocks([3, 0, 5, 2]), rows, start=7)) == []  # the range is done


def test_worker_blocks_stop_reading_after_the_range():
    def blocks():
        yield {"id": np.arange(4)}
        raise AssertionError("read past the worker's rows")

    assert [b["id"].tolist() for _, b in worker_blocks(blocks(), WorkerRows(("f",), 1, 3))] == [[1, 2, 3]]


def test_worker_blocks_refuse_files_that_hold_fewer_rows_than_planned():
    # the plan counted 8 rows from row 1; the files now hold 6 (the store was rewritten)
    with pytest.raises(RuntimeError, match="f, g: 3 of the 8 planned rows from row 1 are missing"):
        list(worker_blocks(_blocks([4, 2]), WorkerRows(("f", "g"), 1, 8)))


def test_fixed_batches_run_on_into_the_next_epoch_and_say_where_they_stopped():
    # a 5-row range, two epochs, batches of 3: no row is dropped at the epoch's end
    rows = WorkerRows(("f",), skip=1, count=5)
    tagged = [((e, off), b) for e in (0, 1) for off, b in worker_blocks(_blocks([4, 4]), rows)]
    out = list(fixed_batches(iter(tagged), batch_size=3))
    assert [b["id"].tolist() for _, b in out] == [[1, 2, 3], [4, 5, 1], [2, 3, 4]]
    assert [b["name"].tolist() for _, b in out][1] == ["r4", "r5", "r1"]
    assert [position for position, _ in out] == [(0, 3), (1, 1), (1, 4)]
    with pytest.raises(ValueError, match="batch_size 0"):
        next(fixed_batches(iter(tagged), batch_size=0))


def _epoch(rows, window, seed, epoch, start=0):
    first = start - start % window if window else start
    blocks = worker_blocks(_blocks([4, 4, 4]), rows, first)
    return list(shuffled_windows(blocks, rows.count, window, seed, epoch, start))


def test_shuffled_windows_permute_each_window_the_same_way_on_every_run():
    rows = WorkerRows(("a", "b", "c"), skip=1, count=10)  # ids 1..10; windows of 4, 4 and 2 rows
    out = _epoch(rows, window=4, seed=0, epoch=0)
    ids = [i for _, b in out for i in b["id"].tolist()]
    assert [off for off, _ in out] == [0, 4, 8]
    assert sorted(ids[:4]) == [1, 2, 3, 4] and sorted(ids[4:8]) == [5, 6, 7, 8] and sorted(ids[8:]) == [9, 10]
    assert ids != list(range(1, 11))  # shuffled ...
    assert [b["name"].tolist() for _, b in out][0] == [f"r{i}" for i in ids[:4]]  # columns stay together
    assert ids == [i for _, b in _epoch(rows, 4, 0, 0) for i in b["id"].tolist()]  # ... the same way each run
    assert ids != [i for _, b in _epoch(rows, 4, 0, 1) for i in b["id"].tolist()]  # another epoch, another order
    assert ids != [i for _, b in _epoch(rows, 4, 1, 0) for i in b["id"].tolist()]  # another seed too
    assert [i for _, b in _epoch(rows, 4, -3, 0) for i in b["id"].tolist()] != ids  # a negative seed works too
    whole = [i for _, b in _epoch(rows, window=64, seed=0, epoch=0) for i in b["id"].tolist()]
    assert sorted(whole) == list(range(1, 11)) and whole != list(range(1, 11))  # one window: the whole range
    assert [i for _, b in _epoch(rows, window=0, seed=0, epoch=0) for i in b["id"].tolist()] == list(range(1, 11))


@pytest.mark.parametrize("start", [0, 3, 4, 8, 9, 10])
def test_shuffled_windows_resume_at_any_offset_exactly(start):
    rows = WorkerRows(("a", "b", "c"), skip=1, count=10)
    ids = [i for _, b in _epoch(rows, 4, 7, 2) for i in b["id"].tolist()]
    resumed = _epoch(rows, 4, 7, 2, start=start)
    assert resumed[0][0] == start
    assert [i for _, b in resumed for i in b["id"].tolist()] == ids[start:]


def test_the_stage_data_stream_resumes_a_shuffled_epoch_exactly():
    """The distill stage's batches over a worker's range: a stream restarted at a saved
    (epoch, rows done) position yields exactly the batches the uninterrupted one went on to."""
    from pipelines.stages.distill.data import worker_batches

    class Shard:  # a worker's Ray Data shard: its files' blocks, in order, each time it is read
        def iter_batches(self, **_):
            return iter(_blocks([4, 4, 4]))

    class Store:
        def decode(self, batch):
            return batch

    rows = WorkerRows(("a", "b", "c"), skip=1, count=10)
    stream = worker_batches(Shard(), rows, Store(), batch_size=3, epoch=0, done=0, window=4, seed=5)
    first = [next(stream) for _ in range(12)]  # 36 rows: three epochs and a bit
    ids = [b["id"].tolist() for _, b in first]
    epoch0 = [i for b in ids for i in b][:10]
    assert sorted(epoch0) == list(range(1, 11)) and epoch0 != list(range(1, 11))
    assert [first[k][0] for k in (6, 9)] == [(2, 1), (2, 10)]  # across an epoch's end; at a range's end
    for k in (0, 2, 5, 6, 8, 9):
        (epoch, done), _ = first[k]
        resumed = worker_batches(Shard(), rows, Store(), batch_size=3, epoch=epoch, done=done, window=4, seed=5)
        assert [next(resumed)[1]["id"].tolist() for _ in range(11 - k)] == ids[k + 1:], k


@pytest.mark.parametrize("resume", [(0, 0), (1, 5)])
def test_a_small_shard_is_read_once_and_gives_the_batches_of_reading_it_every_epoch(resume):
    """Each read of a Ray Data shard starts an execution (seconds); a worker whose rows fit the
    memory budget keeps them after its first pass, a resume mid-epoch included, and its batches
    are those of a worker that reads the shard every epoch."""
    from pipelines.stages.distill.data import worker_batches

    class Shard:
        reads = 0

        def iter_batches(self, **_):
            Shard.reads += 1
            yield from _blocks([4, 4, 4, 4])  # the last file lies past this worker's range

    class Store:
        def decode(self, batch):
            return batch

    rows = WorkerRows(("a", "b", "c"), skip=1, count=10)
    ids = {}
    for budget in (1 << 20, 1):  # 1 byte: nothing fits, every epoch reads the shard again
        Shard.reads = 0
        stream = worker_batches(Shard(), rows, Store(), batch_size=3, epoch=resume[0], done=resume[1], window=4,
                                seed=5, cache_bytes=budget)
        ids[budget] = [next(stream)[1]["id"].tolist() for _ in range(14)]  # four epochs and a bit
        assert Shard.reads == (1 if budget > 1 else 5), budget
    assert ids[1 << 20] == ids[1]


def test_the_memory_budget_counts_the_bytes_of_binary_columns():
    """The store's tensors reach a worker as object arrays of bytes: their size is what the
    values hold (12 rows of 1 kB read here), not the arrays' pointers."""
    from pipelines.stages.distill.data import worker_batches

    class Shard:
        reads = 0

        def iter_batches(self, **_):
            Shard.reads += 1
            for block in _blocks([4, 4, 4, 4]):
                yield {**block, "latents": np.array([bytes(1000)] * len(block["id"]), dtype=object)}

    class Store:
        def decode(self, batch):
            return batch

    rows = WorkerRows(("a", "b", "c"), skip=1, count=10)
    for budget, reads in ((100_000, 1), (5_000, 5)):
        Shard.reads = 0
        stream = worker_batches(Shard(), rows, Store(), batch_size=3, epoch=0, done=0, window=4, seed=5,
                                cache_bytes=budget)
        for _ in range(14):
            next(stream)
        assert Shard.reads == reads, budget


@pytest.mark.ray
def test_each_worker_reads_its_rows_in_order_on_every_run(tmp_path, ray_cluster):
    """Real Ray Data reads on the local cluster, the workers' iterators consumed concurrently:
    the rows are the plan's, the same in two runs (Ray Train's default split varies between runs)."""
    import ray

    from pipelines.store import Store

    data = tmp_path / "store" / "data"
    data.mkdir(parents=True)
    sizes = [1 + (7 * i) % 13 for i in range(40)]  # 40 files of 1 to 13 rows: many parallel read tasks
    start = 0
    for i, n in enumerate(sizes):
        ids = [f"s{j:03d}" for j in range(start, start + n)]
        pq.write_table(pa.table({"sample_id": ids, "pad": [bytes(20_000 * (i % 3))] * n}),
                       data / f"part-{i:02d}.parquet")
        start += n
    store = Store(uri=str(tmp_path / "store"), manifest={})
    plan = plan_shards(store.file_rows(), world=3)
    total = sum(sizes)
    bounds = [total * r // 3 for r in range(4)]

    @ray.remote(num_cpus=0)
    def consume(shard, rows):
        blocks = worker_blocks(shard.iter_batches(batch_size=None, batch_format="numpy"), rows)
        return [i for _, b in blocks for i in b["sample_id"].tolist()]

    def run():
        shards = StoreShards(store, plan).configure({"train": None}, world_size=3, worker_handles=None,
                                                    worker_node_ids=None)
        return ray.get([consume.remote(s["train"], rows) for s, rows in zip(shards, plan)])

    expected = [[f"s{j:03d}" for j in range(bounds[r], bounds[r + 1])] for r in range(3)]
    assert run() == expected
    assert run() == expected


def test_a_saved_data_position_is_kept_only_under_the_same_plan():
    from pipelines.stages.distill.data import data_position

    state = {"epoch": 3, "data_plan": "abc", "data_positions": [[3, 5], [3, 6]]}
    assert data_position(state, "abc", rank=1) == (3, 6, None)
    epoch, done, note = data_position(state, "other", rank=1)  # another store or worker count
    assert (epoch, done) == (4, 0) and "new epoch" in note
    assert data_position({"epoch": 2, "batches_in_epoch": 7}, "abc", rank=0)[:2] == (3, 0)  # an older checkpoint
