"""Engine pieces: checkpoints (atomic, verified), schedules, the step plan (determinism, DDP shards), bad samples."""

import copy
import json

import pytest
import torch

from vision_moe.config import SchedConfig
from vision_moe.engine.checkpoint import CheckpointError, load_model, load_train_state, save_checkpoint
from vision_moe.engine.data import BadSampleTracker, StepPlan, TooManyBadSamples
from vision_moe.engine.optim import lr_factor
from vision_moe.models.multitask import build_multitask_model

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2, expert_hidden=32)
HEADS = dict(head_channels=8, det_channels=32, det_num_convs=1, det_scale_factors=[2.0, 1.0, 0.5])


def _config(tasks: dict) -> dict:
    return {
        "model": {
            "backbone": "m3vit_tiny_patch16_224",
            "tasks": tasks,
            "img_size": 32,
            "head": "setr_pup",
            "head_kwargs": HEADS,
            "backbone_kwargs": TINY,
        }
    }


def _model_and_config():
    tasks = {"classification": 3, "detection": 2, "semseg": 4}
    m = build_multitask_model("m3vit_tiny_patch16_224", tasks, img_size=32, head_kwargs=HEADS, **TINY)
    return m, _config(tasks)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m, cfg = _model_and_config()
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(1, 3, 32, 32), "semseg")["out"].sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 3, "rng": torch.get_rng_state()}
    d = save_checkpoint(tmp_path / "ck", m, cfg, state)
    assert not list(d.glob("*.tmp")) and not list(d.glob(".*"))
    m2, cfg2 = load_model(d)
    assert list(m.state_dict()) == list(m2.state_dict())
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    st = load_train_state(d)
    assert st["step"] == 3 and "state" in st["optimizer"]
    # a truncated weights file
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: sha256"):
        load_model(d)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_model(d, verify=False)
    w.write_bytes(data)
    # a config that does not match the weights
    c = json.loads((d / "config.json").read_text())
    c["model"]["tasks"]["semseg"] = 9
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(CheckpointError, match="do not match config.json"):
        load_model(d)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")


def test_lr_schedules():
    cos = SchedConfig(name="cosine", warmup_steps=10, warmup_start_factor=0.0, min_lr_factor=0.1)
    assert lr_factor(0, 110, cos) == 0.0 and lr_factor(5, 110, cos) == pytest.approx(0.5)
    assert lr_factor(10, 110, cos) == pytest.approx(1.0) and lr_factor(110, 110, cos) == pytest.approx(0.1)
    assert lr_factor(60, 110, cos) == pytest.approx(0.55)
    poly = SchedConfig(name="poly", power=1.0)
    assert lr_factor(50, 100, poly) == pytest.approx(0.5)


def test_step_plan_is_deterministic_and_shards_ranks():
    full = StepPlan([10, 7], batch_size=2, seed=3, mode="weighted", weights=[1.0, 2.0]).plan(0, 30)
    again = StepPlan([10, 7], batch_size=2, seed=3, mode="weighted", weights=[1.0, 2.0])
    assert again.plan(12, 30) == full[12:]  # resuming at step 12 replays the same batches
    assert {d for d, _, _ in full} == {0, 1}
    r0 = StepPlan([10], batch_size=2, seed=0, rank=0, world=2).plan(0, 5)
    r1 = StepPlan([10], batch_size=2, seed=0, rank=1, world=2).plan(0, 5)
    for (_, a, _), (_, b, _) in zip(r0, r1):
        assert len(a) == len(b) == 2 and not set(a) & set(b)  # each rank its own shard
    epoch = sorted(i for _, idx, _ in r0[:2] + r1[:2] for i in idx)
    assert epoch == sorted(set(epoch)) and len(epoch) == 8  # within an epoch no sample repeats
    rr = StepPlan([4, 4, 4], batch_size=1, seed=0).plan(0, 6)
    assert [d for d, _, _ in rr] == [0, 1, 2, 0, 1, 2]


def test_bad_sample_tracker():
    t = BadSampleTracker(max_fraction=0.1, min_seen=10)
    t.update(8, ["a.jpg: cannot decode"])  # 1/8 but fewer than min_seen: not yet judged
    t.update(8, [])
    assert t.fraction == pytest.approx(1 / 16)
    with pytest.raises(TooManyBadSamples, match=r"3 of 20 samples were unreadable .*first: a.jpg: cannot decode"):
        t.update(4, ["b.jpg: truncated", "c.jpg: truncated"])


def test_bad_sample_tracker_counts_past_the_reasons_it_keeps():
    t = BadSampleTracker(max_fraction=0.41, min_seen=10)
    for _ in range(30):
        t.update(100, ["x.jpg: cannot decode"] * 40)  # 40 %: under the limit
    assert t.count == 1200 and len(t.bad) == BadSampleTracker.MAX_REASONS and t.fraction == pytest.approx(0.4)
    with pytest.raises(TooManyBadSamples, match=r"^1290 of 3100 samples were unreadable \(41.6%"):
        t.update(100, ["y.jpg: truncated"] * 90)
    again = BadSampleTracker(0.41)
    again.load_state_dict(t.state_dict())
    assert (again.count, again.seen, again.bad) == (t.count, t.seen, t.bad)
    old = BadSampleTracker(0.41)
    old.load_state_dict({"seen": 10, "bad": ["a.jpg: truncated"]})  # a checkpoint from before the exact count
    assert old.count == 1


def _aux(probs: torch.Tensor):
    from vision_moe.moe import MoEAux

    e = probs.shape[-1]
    idx = probs.topk(2, -1).indices
    return MoEAux(
        task="x",
        probs=probs,
        logits=probs.log(),
        expert_index=idx,
        combine_weights=probs.gather(-1, idx),
        expert_load=torch.zeros(e, dtype=torch.long),
        dropped_fraction=probs.new_zeros(()),
        keep=None,
        load_prob=None,
    )


def test_mi_memory_lets_a_one_task_step_see_the_other_tasks():
    from vision_moe.engine.losses import TaskRoutingMemory, mutual_information_across_tasks
    from vision_moe.moe.losses import mutual_information_loss

    torch.manual_seed(0)
    pa = torch.softmax(torch.randn(10, 4), -1)
    pb = torch.softmax(torch.randn(12, 4) * 2, -1)
    # without memory a one-task step has no MI term (the problem the memory solves)
    assert mutual_information_across_tasks({"a": [_aux(pa)]}, 0.1) is None
    mem = TaskRoutingMemory(["a", "b", "c"], [4], momentum=0.5)
    assert mutual_information_across_tasks({"a": [_aux(pa)]}, 0.1, mem) is None  # nothing else seen yet
    torch.testing.assert_close(mem.layer(0)[0], pa.mean(0))  # first visit: the mean itself
    # a step of task b alone: its live row against a's remembered row; the gradient reaches only b's probs
    logits_b = torch.randn(12, 4, requires_grad=True)
    pb = torch.softmax(logits_b, -1)
    loss = mutual_information_across_tasks({"b": [_aux(pb)]}, 0.1, mem)
    expected = 0.1 * mutual_information_loss(torch.stack([pb.mean(0), pa.mean(0)]))
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits_b.grad.abs().sum() > 0 and mem.layer(0).grad is None
    assert mem.seen.tolist() == [True, True, False]
    # moving average on a second visit
    pa2 = torch.softmax(torch.randn(10, 4), -1)
    mutual_information_across_tasks({"a": [_aux(pa2)]}, 0.1, mem)
    torch.testing.assert_close(mem.layer(0)[0], 0.5 * pa.mean(0) + 0.5 * pa2.mean(0))
    # tasks of the same step are all live: identical to the memory-less loss
    both = {"a": [_aux(pa)], "b": [_aux(pb.detach())]}
    fresh = TaskRoutingMemory(["a", "b"], [4])
    torch.testing.assert_close(
        mutual_information_across_tasks(both, 0.1, fresh), mutual_information_across_tasks(both, 0.1)
    )
    with pytest.raises(ValueError, match="mi_momentum=1.0"):
        TaskRoutingMemory(["a"], [4], momentum=1.0)


class _Samples(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        img = torch.full((3, 8, 8), float(i))
        t = {
            "image_id": i,
            "boxes": torch.arange(4.0 * i).reshape(i, 4),  # sample 0 has no boxes
            "labels": torch.arange(i),
            "semseg": torch.full((8, 8), i, dtype=torch.int64),
            "class_label": torch.tensor(i),
            "file": f"img{i}.png",
        }
        return img, t


def test_packed_targets_come_back_equal_from_a_loader_worker():
    from vision_moe.data import collate_multitask
    from vision_moe.engine.data import PackedTargets

    ds = _Samples()
    _, expected = collate_multitask([ds[i] for i in range(4)])

    def collate(batch):
        images, targets = collate_multitask(batch)
        return images, PackedTargets(targets)

    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=1)
    images, packed = next(iter(loader))
    assert len(packed.buffers) == 2  # one buffer per dtype (float32, int64) whatever the number of samples
    got = packed.unpack()
    assert len(got) == len(expected) == 4
    for g, e in zip(got, expected):
        assert list(g) == list(e)
        for k in e:
            if isinstance(e[k], torch.Tensor):
                assert g[k].dtype == e[k].dtype and g[k].shape == e[k].shape
                torch.testing.assert_close(g[k], e[k], rtol=0, atol=0)
            else:
                assert g[k] == e[k]


def test_checkpoint_keeps_the_task_order(tmp_path):
    """Task-conditioned routers index their task embedding by the task's position: a reloaded model must see
    its tasks in the order it was trained with, not in the order a sorted config.json would list them."""
    from vision_moe.models.restoration import build_restoration_model

    tasks = {"semseg": 4, "classification": 3}  # not alphabetical
    m = build_multitask_model("m3vit_tiny_patch16_224", tasks, img_size=32, head_kwargs=HEADS, **TINY).eval()
    cfg = _config(tasks)
    degs = ["lowlight", "deblur"]
    r = build_restoration_model("mofme_tiny_patch8", degs, img_size=32, router="task_embed").eval()
    with torch.no_grad():  # the task embeddings differ, so a permutation would change the outputs
        for p in list(m.parameters()) + list(r.parameters()):
            p.add_(0.05 * torch.randn_like(p))
    rcfg = {
        "model": {
            "backbone": "mofme_tiny_patch8",
            "kind": "restoration",
            "tasks": dict.fromkeys(degs, 3),
            "img_size": 32,
            "backbone_kwargs": {"router": "task_embed"},
        }
    }
    x = torch.randn(2, 3, 32, 32)
    for model, c, names in ((m, cfg, list(tasks)), (r, rcfg, degs)):
        again = load_model(save_checkpoint(tmp_path / names[0], model, c))[0].eval()
        assert list(again.tasks) == names
        with torch.no_grad():
            for t in names:
                torch.testing.assert_close(again(x, t)["out"], model(x, t)["out"], rtol=0, atol=0)


def test_fused_adamw_updates_equal_the_foreach_implementation():
    """optim.fused (default) picks PyTorch's fused AdamW; its updates equal the foreach AdamW's to float rounding
    over several steps (decay and no-decay groups, clipping-free)."""
    from vision_moe.config import OptimConfig
    from vision_moe.engine.optim import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))]
    models.append(copy.deepcopy(models[0]))
    start = copy.deepcopy(models[0])
    opts = [build_optimizer(m, OptimConfig(lr=1e-2, fused=f)) for m, f in zip(models, (True, False))]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    for _ in range(5):
        x = torch.randn(4, 8)
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(models[0][0].weight, start[0].weight)  # the steps did move the weights
