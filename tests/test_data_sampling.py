"""Multi-task sampling: weights, round-robin, determinism, exact resume, DDP sharding."""

import collections

import pytest
import torch

from vision_moe.data.sampling import MultiTaskLoader, ShardedInfiniteSampler, TaskScheduler


class _Toy(torch.utils.data.Dataset):
    def __init__(self, n, tasks, offset):
        self.n, self.tasks, self.offset = n, tasks, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((3, 4, 4), float(i)), {"image_id": self.offset + i}


def test_weighted_and_round_robin():
    s = TaskScheduler(["a", "b", "c"], {"a": 6, "b": 3, "c": 1}, seed=1)
    counts = collections.Counter(next(s) for _ in range(5000))
    assert counts["a"] / 5000 == pytest.approx(0.6, abs=0.03) and counts["c"] / 5000 == pytest.approx(0.1, abs=0.02)
    rr = TaskScheduler(["a", "b"], mode="round_robin")
    assert [next(rr) for _ in range(5)] == ["a", "b", "a", "b", "a"]
    assert [TaskScheduler(["a", "b", "c"], seed=4).task_at(i) for i in range(30)] == [
        TaskScheduler(["a", "b", "c"], seed=4).task_at(i) for i in range(30)
    ]
    with pytest.raises(ValueError, match="unknown mode"):
        TaskScheduler(["a"], mode="random")
    with pytest.raises(ValueError, match="unknown sources"):
        TaskScheduler(["a"], {"z": 1.0})


def test_sharded_sampler_disjoint_and_complete():
    shards = [ShardedInfiniteSampler(10, seed=3, rank=r, world_size=3) for r in range(3)]
    per_rank = [[s.next_index() for _ in range(4)] for s in shards]  # ceil(10 / 3) = 4 per rank per epoch
    flat = sum(per_rank, [])
    assert set(flat) == set(range(10)) and len(flat) == 12  # 2 indices wrapped to pad the epoch
    nxt = [s.next_index() for s in shards]  # next epoch, new permutation
    assert len(set(nxt)) == 3
    with pytest.raises(ValueError, match="rank 2 outside"):
        ShardedInfiniteSampler(5, rank=2, world_size=2)


def test_loader_resume_is_exact():
    sources = {"det": _Toy(7, ("detection",), 0), "seg": _Toy(5, ("semseg", "depth"), 100)}
    ref = MultiTaskLoader(sources, {"det": 2, "seg": 3}, weights=[1, 1], seed=0)
    full = [next(ref) for _ in range(12)]
    a = MultiTaskLoader(sources, {"det": 2, "seg": 3}, weights=[1, 1], seed=0)
    for _ in range(5):
        next(a)
    state = a.state_dict()
    b = MultiTaskLoader(sources, {"det": 2, "seg": 3}, weights=[1, 1], seed=0)
    b.load_state_dict(state)
    rest = [next(b) for _ in range(7)]
    for x, y in zip(full[5:], rest):
        assert (x.source, x.step, x.tasks) == (y.source, y.step, y.tasks)
        assert [t["image_id"] for t in x.targets] == [t["image_id"] for t in y.targets]
        assert torch.equal(x.images, y.images)
    assert {b.source for b in full} == {"det", "seg"}
    assert all(len(b.targets) == (2 if b.source == "det" else 3) for b in full)


def test_ddp_ranks_same_task_disjoint_samples():
    sources = {"det": _Toy(8, ("detection",), 0), "cls": _Toy(6, ("classification",), 100)}
    ranks = [MultiTaskLoader(sources, 2, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        b0, b1 = next(ranks[0]), next(ranks[1])
        assert b0.source == b1.source  # every rank runs the same task at the same step
    # within the first epoch of 'det', the two ranks saw disjoint images
    r = [MultiTaskLoader({"det": sources["det"]}, 2, seed=5, rank=k, world_size=2) for k in range(2)]
    ids = [{t["image_id"] for _ in range(2) for t in next(r[k]).targets} for k in range(2)]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 8
    with pytest.raises(ValueError, match="state has sources"):
        ranks[0].load_state_dict({"scheduler": {"step": 0}, "samplers": {"x": {"epoch": 0, "pos": 0}}})
