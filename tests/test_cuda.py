"""The engine on a CUDA GPU: dispatchers and models equal their CPU run, AMP (bf16, fp16 with a GradScaler)
trains, checkpoints reproduce their metrics on the GPU, resume replays, and torchrun uses NCCL.

These need a GPU and are skipped without one (CI has none); run them with ``python -m pytest tests/test_cuda.py``
on a machine that has one. The CPU-side parts of the same logic (AMP dtype choice, device names) are tested in
the other files."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from test_train import ROOT, _free_port, tiny

import vision_moe
from vision_moe.config import config_from_dict
from vision_moe.engine import evaluate_checkpoint, latest_checkpoint
from vision_moe.engine.trainer import Trainer
from vision_moe.moe import DISPATCHERS, MoEMlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("builtin_cuda")


def _gpu(**train) -> dict:
    return {"device": "cuda", "progress": False, "tensorboard": False, "log_every": 1, "threads": 1, **train}


@pytest.mark.parametrize("name", sorted(DISPATCHERS))
def test_dispatchers_on_cuda_equal_the_cpu_layer(name):
    torch.manual_seed(0)
    # eval mode: no router noise (its draws differ between the CPU and CUDA generators); gradients still flow
    cpu = MoEMlp(32, 48, 6, 2, ["a", "b"], dispatcher=name).eval()
    gpu = MoEMlp(32, 48, 6, 2, ["a", "b"], dispatcher=name).cuda().eval()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(3, 17, 32, requires_grad=True)
    xg = x.detach().cuda().requires_grad_(True)
    y, _ = cpu(x, "b")
    yg, _ = gpu(xg, "b")
    y.square().sum().backward()
    yg.square().sum().backward()
    torch.testing.assert_close(yg.cpu(), y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xg.grad.cpu(), x.grad, atol=1e-4, rtol=1e-4)
    for (k, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-4, rtol=1e-4, msg=k)


def test_multitask_model_on_cuda_equals_cpu():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2)
    cpu = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=["semseg", "depth"], **kw).eval()
    gpu = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=["semseg", "depth"], **kw).eval().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for task in ("semseg", "depth"):
            torch.testing.assert_close(gpu(x.cuda(), task)[0].cpu(), cpu(x, task)[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_amp_training_on_cuda_lowers_the_loss_and_its_checkpoint_reproduces_the_metrics(tmp_path, data_root, dtype):
    amp = {"amp": dtype != "fp32", "amp_dtype": dtype if dtype != "fp32" else "auto"}
    cfg = config_from_dict(tiny(data_root, train=_gpu(steps=40, **amp), data={"batch_size": 8}))
    tr = Trainer(cfg, tmp_path / "run")
    assert tr.device.type == "cuda"
    assert tr.scaler.is_enabled() == (dtype == "fp16")  # loss scaling exactly where fp16 needs it
    metrics = tr.fit()
    h = tr.loss_history
    assert len(h) == 40 and all(map(torch.isfinite, torch.tensor(h)))
    assert sum(h[-5:]) / 5 < 0.85 * sum(h[:5]) / 5, h
    if dtype == "fp16":
        assert 0 < tr.scaler.get_scale() < float("inf")
    assert next(tr.model.parameters()).dtype == torch.float32  # autocast: the weights stay fp32
    ck = latest_checkpoint(tmp_path / "run")
    for task in ("classification", "semseg", "detection"):
        assert evaluate_checkpoint(ck, task, device="cuda") == metrics[task], task


def test_resume_on_cuda_continues_the_trajectory(tmp_path, data_root):
    base = tiny(data_root, train=_gpu(steps=6, ckpt_every=3), moe={"mi_weight": 0.5})
    straight = Trainer(config_from_dict(base), tmp_path / "a")
    straight.fit()
    first = Trainer(config_from_dict({**base, "train": {**base["train"], "steps": 6}}), tmp_path / "b")
    forward = first.step_module.forward
    calls = {"n": 0}

    def dying_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    first.step_module.forward = dying_forward
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    resumed = Trainer(config_from_dict(base), tmp_path / "b", resume=True)
    assert resumed.step == 3
    resumed.fit()
    # GPU scatter-adds and cuDNN kernels accumulate in a run-dependent order, so the continuation equals the
    # uninterrupted run up to float rounding, not bit for bit (the CPU test asserts bit-identity). A resume that
    # lost the optimizer, scheduler, sampler or RNG state moves the losses far more than this tolerance.
    assert resumed.loss_history == pytest.approx(straight.loss_history[3:], rel=1e-4, abs=1e-5)
    # Adam turns rounding-level gradient differences of near-zero gradients into steps of up to lr (2e-3): the
    # weights agree to a few such steps, not to float rounding
    for (k, v), (_, w) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(w.float(), v.float(), atol=1e-2, rtol=0, msg=k)


def test_ddp_over_nccl_in_one_process(tmp_path, data_root, monkeypatch):
    """A one-rank NCCL process group (all this machine may have): the trainer wraps DDP on the GPU, its
    all-reduces and barriers go through NCCL, and rank 0 writes the checkpoint that reproduces its metrics."""
    import torch.distributed as dist

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        tr = Trainer(config_from_dict(tiny(data_root, train=_gpu(steps=4))), tmp_path / "out")
        assert tr.distributed and dist.get_backend() == "nccl"
        assert isinstance(tr.step_module, torch.nn.parallel.DistributedDataParallel)
        assert tr.device == torch.device("cuda", 0)
        metrics = tr.fit()
    finally:
        dist.destroy_process_group()
    ck = latest_checkpoint(tmp_path / "out")
    assert ck is not None and ck.name == "step_0000004"
    assert evaluate_checkpoint(ck, "semseg", device="cuda") == metrics["semseg"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="torchrun over NCCL needs 2 GPUs (one rank per GPU)")
def test_torchrun_on_cuda_uses_nccl(tmp_path, data_root):
    n = 2  # one process per GPU (NCCL refuses two ranks on one device)
    cfg = tiny(data_root, train=_gpu(steps=4))
    p = tmp_path / "ddp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    probe = tmp_path / "backend.txt"
    # tools/train.py run under torchrun, with a hook that records the backend the trainer's process group got
    code = (
        "import runpy, sys, torch.distributed as dist\n"
        "init = dist.init_process_group\n"
        "def spy(*a, **k):\n"
        "    init(*a, **k)\n"
        f"    open({str(probe)!r} + str(dist.get_rank()), 'w').write(dist.get_backend())\n"
        "dist.init_process_group = spy\n"
        f"sys.argv = [{str(ROOT / 'tools' / 'train.py')!r}] + sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    launcher = tmp_path / "launch.py"
    launcher.write_text(code)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
           str(_free_port()), str(launcher), "--config", str(p), "--out", str(tmp_path / "out")]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(n):
        assert (tmp_path / f"backend.txt{rank}").read_text() == "nccl"
    ck = latest_checkpoint(tmp_path / "out")
    assert ck is not None and ck.name == "step_0000004"
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())["latest"]["metrics"]
    assert evaluate_checkpoint(ck, "semseg", device="cuda") == pytest.approx(m["semseg"], nan_ok=True)


def test_bench_mofme_runs_on_cuda():
    """benchmarks/bench_mofme.py --device cuda: both models on the GPU, timed with a synchronisation per call; the
    parameter counts are the CPU's and every ratio is a positive number."""
    from tool_loader import load_script

    bench = load_script("benchmarks/bench_mofme.py")
    row = bench.bench(4, 2, rounds=1, device="cuda")
    for kind, name in bench.KINDS.items():
        cpu = vision_moe.create_model(name, num_experts=4, top_k=2)
        assert row[f"{kind}_model_params_m"] * 1e6 == pytest.approx(sum(p.numel() for p in cpu.parameters()))
    for what in ("layer", "model"):
        for how in ("fastest", "sort", "dense"):
            assert 0 < row[f"{what}_time_ratio_{how}"] < float("inf")
