"""The multi-task trainer: one dataset per step, the backbone run once per task of that dataset, MoE aux
losses from the returned aux records, AMP, clipping, atomic checkpoints, exact resume, DDP via torchrun."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..config import Config, config_to_dict, dataset_tasks
from ..models.multitask import build_multitask_model
from ..tasks import RestorationLoss, get_task, is_restoration
from . import distributed as dist_utils
from .checkpoint import (
    CheckpointError,
    build_model,
    latest_checkpoint,
    load_model,
    load_train_state,
    save_checkpoint,
)
from .data import (
    BadSampleTracker,
    PlanDataset,
    StepPlan,
    TooManyBadSamples,
    build_dataset,
    collate_plan,
    split_by_task,
    train_size_at,
)
from .evaluator import evaluate_routes, evaluate_task, heldout_loader, task_datasets
from .losses import TaskRoutingMemory, UncertaintyWeighting, moe_aux_loss, mutual_information_across_tasks
from .optim import build_optimizer, build_scheduler
from .reporter import Reporter, format_restoration_table, format_routes_table, format_table

__all__ = ["Trainer", "train", "model_config", "evaluate_checkpoint", "evaluate_checkpoint_tasks", "resolve_device"]

_logger = logging.getLogger(__name__)


def resolve_device(name: str, what: str = "device") -> torch.device:
    """``'auto'`` (CUDA if available) or a device this machine has; otherwise a ValueError naming ``what``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{what} {name!r}: not a device; expected 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{what} {name!r}: this machine has no CUDA device; expected 'auto' or 'cpu'")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{what} {name!r}: this machine has {n} CUDA device(s); expected cuda:0 .. cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{what} {name!r}: MPS is not available on this machine; expected 'auto' or 'cpu'")
    elif dev.type != "cpu":
        raise ValueError(f"{what} {name!r}: unsupported device type; expected 'auto', 'cpu', 'cuda[:N]' or 'mps'")
    return dev


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.amp`` on ``device`` (None: full precision). ``'auto'`` is bf16 on CPU and
    on CUDA devices that support it (Ampere and later), else fp16, which then trains with a GradScaler."""
    if not cfg.train.amp:
        return None
    dtype = cfg.train.amp_dtype
    if dtype == "auto":
        dtype = "bf16" if device.type != "cuda" or torch.cuda.is_bf16_supported() else "fp16"
    return torch.bfloat16 if dtype == "bf16" else torch.float16


def _amp_ctx(cfg: Config, device: torch.device):
    dtype = amp_dtype(cfg, device)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def model_config(cfg: Config, num_classes: dict[str, int | None]) -> dict[str, Any]:
    """What ``config.json`` holds: everything to rebuild the model, plus the experiment config, whose dataset roots
    are made absolute (a root relative to where training ran would name another folder from anywhere else)."""
    m = cfg.model
    experiment = config_to_dict(cfg)
    for d in experiment["data"]["datasets"]:
        d["root"] = str(Path(d["root"]).expanduser().absolute())
    if all(is_restoration(t) for t in num_classes):
        model = {
            "kind": "restoration",
            "backbone": m.backbone,
            "tasks": dict(num_classes),
            "img_size": m.img_size,
            "backbone_kwargs": dict(m.backbone_kwargs),
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        }
        return {"model": model, "experiment": experiment}
    head_kwargs = dict(
        head_channels=m.head_channels,
        head_norm=m.head_norm,
        det_channels=m.det_channels,
        det_num_convs=m.det_num_convs,
        det_scale_factors=list(m.det_scale_factors),
        cls_pool=m.cls_pool,
    )
    if any(is_restoration(t) for t in num_classes):  # the degradations' shared MoE decoder head
        head_kwargs["restoration_head"] = dict(m.restoration_head)
    return {
        "model": {
            "backbone": m.backbone,
            "tasks": dict(num_classes),
            "img_size": m.img_size,
            "head": m.head,
            "head_kwargs": head_kwargs,
            "backbone_kwargs": dict(m.backbone_kwargs),
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
        },
        "experiment": experiment,
    }


def restoration_losses(cfg: Config) -> dict[str, RestorationLoss]:
    """The configured loss of every restoration task (``tasks.<t>.loss``, ``perceptual_weight``)."""
    return {
        t: RestorationLoss("l1" if tc.loss == "default" else tc.loss, tc.perceptual_weight)
        for t, tc in cfg.tasks.items()
        if is_restoration(t)
    }


def build_model_from_config(
    mc: dict[str, Any], pretrained: bool = False, losses: dict[str, RestorationLoss] | None = None
) -> nn.Module:
    """The model ``config.json`` describes; ``pretrained``: its backbone from its weight tag's weights (multi-task
    models); ``losses``: a restoration model's per-task losses (see :func:`build_model`)."""
    m = mc["model"]
    if m.get("kind") == "restoration":
        return build_model(m, losses)
    return build_multitask_model(
        m["backbone"],
        m["tasks"],
        img_size=m["img_size"],
        head=m["head"],
        head_kwargs=m["head_kwargs"],
        losses=losses,
        **m["backbone_kwargs"],
        **({"pretrained": True} if pretrained else {}),
    )


class _StepModule(nn.Module):
    """One training step's forward: every task of the step's dataset on the same images, losses combined.
    A single module call so DDP sees one forward per backward."""

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        uncertainty: UncertaintyWeighting | None,
        mi_memory: TaskRoutingMemory | None = None,
    ) -> None:
        super().__init__()
        self.model, self.cfg, self.uncertainty, self.mi_memory = model, cfg, uncertainty, mi_memory

    def forward(self, images: torch.Tensor, targets: list[dict], tasks: Sequence[str]):
        if len(tasks) > 1 and all(is_restoration(t) for t in tasks):  # a restoration set's mixed batch
            return self._forward_mixed(images, targets)
        total = images.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        aux_by_task = {}
        # one image batch, several tasks (M³ViT runs the backbone once per task): the task-independent stages
        # (the stem above all, the costliest part of the quickstart's backbone) run once for all of them
        shared = self.model.forward_shared(images) if len(tasks) > 1 else None
        for task in tasks:
            r = self.model(images, task, targets, shared=shared)
            loss_t = sum(r["losses"].values())
            logs[task] = loss_t.detach()
            w = self.cfg.tasks[task].weight
            total = total + (self.uncertainty(task, w * loss_t) if self.uncertainty is not None else w * loss_t)
            aux_l = moe_aux_loss(r["aux"], self.cfg.moe)
            if aux_l is not None:
                total = total + aux_l
                logs[f"moe_aux/{task}"] = aux_l.detach()
            aux_by_task[task] = r["aux"]
            total = total + self._classifier_loss(r, logs, f"classifier/{task}")
        mi = mutual_information_across_tasks(aux_by_task, self.cfg.moe.mi_weight, self.mi_memory)
        if mi is not None:
            total = total + mi
            logs["moe_mi"] = mi.detach()
        return total, logs, _loads(aux_by_task)

    def _forward_mixed(self, images: torch.Tensor, targets: list[dict]):
        """A batch whose images each have their own task (restoration: one degradation per image, all-in-one
        training): one forward, each task's loss over its images, weighted by its share of the batch."""
        r = self.model(images, None, targets)
        total = images.new_zeros((), dtype=torch.float32)
        logs: dict[str, torch.Tensor] = {}
        n = sum(r["task_counts"].values())
        for task, loss_t in r["task_losses"].items():
            logs[task] = loss_t.detach()
            w = self.cfg.tasks[task].weight * r["task_counts"][task] / n
            total = total + (self.uncertainty(task, w * loss_t) if self.uncertainty is not None else w * loss_t)
        aux_l = moe_aux_loss(r["aux"], self.cfg.moe)
        if aux_l is not None:
            total = total + aux_l
            logs["moe_aux/mixed"] = aux_l.detach()
        total = total + self._classifier_loss(r, logs, "classifier/mixed")
        return total, logs, _loads({"mixed": r["aux"]})

    def _classifier_loss(self, r: dict, logs: dict, name: str) -> torch.Tensor | float:
        """A classifier-routed restoration model's cross-entropy on the degradation, weighted by
        ``moe.classifier_weight`` (0 when the model has none)."""
        ce = r.get("classifier_loss")
        if ce is None or not self.cfg.moe.classifier_weight:
            return 0.0
        logs[name] = ce.detach()
        return self.cfg.moe.classifier_weight * ce


def _loads(aux_by_task: dict) -> dict[str, list[list[float]]]:
    return {
        t: [(a.expert_load.float() / a.expert_load.sum().clamp_min(1)).tolist() for a in aux]
        for t, aux in aux_by_task.items()
    }


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        # one state per visible GPU (router noise, dropout on CUDA draw from these)
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    cuda = s.get("cuda") or []  # absent in checkpoints written before it was saved
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((s["python_version"], tuple(s["python"]), s["python_gauss"]))
    np.random.set_state(
        ("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_gauss"][0], s["numpy_gauss"][1])
    )


class Trainer:
    """Builds data, model, optimiser and schedule from a :class:`Config`; :meth:`fit` trains and evaluates."""

    def __init__(self, cfg: Config, out_dir: str | Path, resume: bool = False) -> None:
        self.cfg, self.out_dir = cfg, Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"{self.out_dir}: is a file; expected a folder for the run (new, or holding a run)")
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = resolve_device(cfg.train.device, "train.device")
        self.distributed = dist_utils.init_distributed(self.device)
        if self.distributed and self.device.type == "cuda":  # under torchrun each rank owns GPU LOCAL_RANK
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.main = self.rank == 0
        old = latest_checkpoint(self.out_dir) if not resume and self.main else None
        if old is not None:
            # a new run would overwrite some of the old run's checkpoints and leave the later ones, which a
            # later --resume would continue: refuse rather than mix two runs in one folder
            raise CheckpointError(
                f"{self.out_dir}: already holds checkpoints of a run (newest: {old.name}); "
                "expected --resume to continue it, or a new --out folder (or --overwrite to discard it)"
            )
        if self.main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # a parent is a file, no permission...: one line that names the folder
                raise OSError(f"{self.out_dir}: cannot create the run folder ({e.strerror or e})") from None
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed)
        # data (the built-in set is generated by rank 0 first; prepare_builtin is atomic and cached)
        if self.main:
            self.train_sets = self._build_sets(cfg.data.datasets, train=True)
        dist_utils.barrier()
        if not self.main:
            self.train_sets = self._build_sets(cfg.data.datasets, train=True)
        # data.size_schedule: the same samples with the crop size of each scheduled size (the step -> size map is a
        # pure function of the step, so a resumed run crops as an uninterrupted one)
        # pools[size]: the loader's datasets at that crop size, model.img_size's (the train sets) first
        self.pools = {cfg.model.img_size: [ds for ds, _ in self.train_sets]}
        for s in sorted({s for _, s in cfg.data.size_schedule} - {cfg.model.img_size}):
            self.pools[s] = [ds for ds, _ in self._build_sets(cfg.data.datasets, train=True, img_size=s)]
        self.num_classes = self._num_classes()
        self.model_cfg = model_config(cfg, self.num_classes)
        torch.manual_seed(cfg.train.seed)
        # a fresh run may start from pretrained weights; a resumed one takes every weight from its checkpoint
        self.model = build_model_from_config(
            self.model_cfg, cfg.model.pretrained and not resume, restoration_losses(cfg)
        ).to(self.device)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        if cfg.train.channels_last:  # weights (and the optimizer's moments, made like them) stay NHWC on resume
            self.model.to(memory_format=torch.channels_last)
        self.uncertainty = (
            UncertaintyWeighting(list(cfg.tasks)).to(self.device) if cfg.train.uncertainty_weighting else None
        )
        moe_layers = self.model.moe_layers()
        self.mi_memory = (
            TaskRoutingMemory(list(cfg.tasks), [m.num_experts for _, m in moe_layers], cfg.moe.mi_momentum).to(
                self.device
            )
            if cfg.moe.mi_weight and moe_layers
            else None
        )
        extra = list(self.uncertainty.parameters()) if self.uncertainty is not None else None
        self.optimizer = build_optimizer(self.model, cfg.optim, extra)
        self.scheduler = build_scheduler(self.optimizer, cfg.sched, cfg.train.steps)
        self.amp_ctx = _amp_ctx(cfg, self.device)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none. The dtype is the
        # resolved one: 'auto' on a GPU without bf16 (before Ampere) is fp16 too.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.device.type == "cuda" and amp_dtype(cfg, self.device) == torch.float16
        )
        self.plan = StepPlan(
            [len(ds) for ds, _ in self.train_sets],
            cfg.data.batch_size,
            cfg.train.seed,
            cfg.data.sampling,
            self.set_weights,
            self.rank,
            self.world,
        )
        self.bad = BadSampleTracker(cfg.data.max_bad_fraction)
        self.step = 0
        self.loss_history: list[float] = []  # total loss of each step run by this Trainer
        if resume:
            self._resume()
        self.step_module = _StepModule(self.model, cfg, self.uncertainty, self.mi_memory)
        if self.distributed:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )  # other tasks' heads and unrouted experts get no gradient
        self._val: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def _build_sets(self, datasets, train: bool, img_size: int | None = None) -> list[tuple[Any, list[str]]]:
        """(dataset, tasks) per step kind: a restoration set gives one per degradation (see split_by_task).
        ``img_size``: a training crop size other than ``model.img_size`` (data.size_schedule)."""
        out = []
        self.set_weights = []
        bar = self.main and self.cfg.train.progress  # generating the built-in data: a bar, else periodic log lines
        for ds in datasets:
            tasks = dataset_tasks(ds, self.cfg.tasks)
            split = ds.train_split if train else ds.val_split
            built = build_dataset(ds, self.cfg, split, train, tasks, progress=bar, img_size=img_size)
            for pair in split_by_task(built, tasks, mixed=train and self.cfg.data.mixed_batches):
                out.append(pair)
                self.set_weights.append(ds.sample_weight)
        return out

    def _num_classes(self) -> dict[str, int | None]:
        nc: dict[str, int | None] = {}
        for t, tc in self.cfg.tasks.items():
            n = tc.num_classes
            if n is None:
                for ds, tasks in self.train_sets:
                    if t in tasks and t in getattr(ds, "num_classes", {}):
                        n = ds.num_classes[t]
                        break
            if n is None:
                n = get_task(t).out_channels
            if n is None:
                raise ValueError(f"tasks.{t}.num_classes: not given and no dataset reports it")
            nc[t] = n
        missing = [t for t in self.cfg.tasks if not any(t in tasks for _, tasks in self.train_sets)]
        if missing:
            raise ValueError(f"tasks {missing} are not labelled by any dataset under data.datasets")
        return nc

    def _train_state(self) -> dict[str, Any]:
        s = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": {"step": self.step, "seed": self.cfg.train.seed},
            "rng": _rng_state(),
            "bad_samples": self.bad.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        if self.uncertainty is not None:
            s["uncertainty"] = self.uncertainty.state_dict()
        if self.mi_memory is not None:
            s["mi_memory"] = self.mi_memory.state_dict()
        return s

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            _logger.warning("--resume: no checkpoint under %s; starting from scratch", self.out_dir)
            return
        model, saved = load_model(ckpt)
        saved_cfg, cur = saved.get("model", {}), json.loads(json.dumps(self.model_cfg["model"]))  # as stored
        if saved_cfg != cur:
            diff = sorted(k for k in set(saved_cfg) | set(cur) if saved_cfg.get(k) != cur.get(k))
            raise CheckpointError(
                f"{ckpt}: made with a different model than this run's config (model.{diff[0]}: checkpoint "
                f"{saved_cfg.get(diff[0])!r}, config {cur.get(diff[0])!r}; differing: {', '.join(diff)}); "
                "expected the same model to resume"
            )
        order, cur_order = list(saved_cfg.get("tasks", {})), list(cur.get("tasks", {}))
        if order != cur_order:  # equal dicts, another order: task-conditioned routers index tasks by position
            raise CheckpointError(
                f"{ckpt}: model.tasks in another order than this run's config (checkpoint {order}, config "
                f"{cur_order}); task-conditioned routing indexes the tasks by position: list them in the checkpoint's "
                "order to resume"
            )
        self.model.load_state_dict(model.state_dict())
        st = load_train_state(ckpt)
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        self.scaler.load_state_dict(st["scaler"])
        if self.uncertainty is not None and "uncertainty" in st:
            self.uncertainty.load_state_dict(st["uncertainty"])
        if self.mi_memory is not None and "mi_memory" in st:
            self.mi_memory.load_state_dict(st["mi_memory"])
        self.bad.load_state_dict(st["bad_samples"])
        self.step = int(st["step"])
        _set_rng_state(st["rng"])
        _logger.info("resumed from %s at step %d", ckpt, self.step)

    def save(self) -> Path | None:
        """Checkpoint to ``out_dir/checkpoints/step_XXXXXXX`` (rank 0 only)."""
        path = None
        if self.main:
            path = save_checkpoint(
                self.out_dir / "checkpoints" / f"step_{self.step:07d}", self.model, self.model_cfg, self._train_state()
            )
        dist_utils.barrier()
        return path

    # ------------------------------------------------------------------ evaluation
    def _val_loaders(self) -> dict[str, tuple[Any, Any]]:
        if not self._val:
            self._val = val_loaders(self.cfg)
        return self._val

    def evaluate(self, routing: dict | None = None) -> dict[str, dict[str, float]]:
        """Metrics of every task on its held-out split (rank 0 computes; other ranks wait). ``routing`` receives each
        task's assignments per expert (see :func:`evaluate_task`)."""
        results: dict[str, dict[str, float]] = {}
        if self.main:
            for task, (loader, ds) in self._val_loaders().items():
                results[task] = evaluate_task(
                    self.model,
                    task,
                    loader,
                    ds,
                    self.num_classes[task],
                    self.device,
                    self.cfg.train.eval_max_batches,
                    self.amp_ctx,
                    self.cfg.data.crop_border,
                    routing=routing,
                )
        dist_utils.barrier()
        return results

    def _moe_layer_names(self) -> list[str]:
        """The MoE layers of the routed network (a multi-task model's backbone, a restoration model's net), named
        as in that network."""
        inner = self.model.backbone if hasattr(self.model, "backbone") else self.model.net
        return [n for n, _ in inner.moe_layers()]

    def _evaluate_and_report(self, rep: Reporter) -> None:
        """Evaluate, report the metrics, and send the routing heatmaps of the held-out images to TensorBoard."""
        routing: dict = {}
        rep.evaluation(self.step, self.evaluate(routing))
        rep.routing_heatmaps(self.step, routing, self._moe_layer_names())

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, dict[str, float]]:
        cfg = self.cfg
        total = cfg.train.steps
        rep = Reporter(self.out_dir, total, self.step, self.main, cfg.train.progress, cfg.train.tensorboard)
        entries = self.plan.plan(self.step, total)
        # the loader sees the pools one after another: dataset d at the k-th size is item k * n + d
        sizes, n = list(self.pools), len(self.train_sets)
        batches = []
        for j, (d, idx, seeds) in enumerate(entries):
            k = sizes.index(train_size_at(cfg.data.size_schedule, self.step + j, cfg.model.img_size))
            batches.append([(k * n + d, i, s) for i, s in zip(idx, seeds)])
        loader = torch.utils.data.DataLoader(
            PlanDataset([ds for pool in self.pools.values() for ds in pool]),
            batch_sampler=batches,
            collate_fn=collate_plan,
            num_workers=cfg.data.num_workers,
            generator=torch.Generator(),
        )
        if cfg.data.size_schedule and self.step < total:
            rep.message(f"training crop size by step (data.size_schedule): {schedule_text(cfg, total)}")
        self.model.train()
        t0 = time.perf_counter()
        metrics: dict[str, dict[str, float]] = {}
        try:
            for (d, idx, _), (images, packed, bad) in zip(entries, loader):
                targets = packed.unpack()
                self.bad.update(len(idx), bad)
                tasks = self.train_sets[d][1]
                empty = not targets  # every sample of this batch was unreadable (counted above)
                if self.distributed:  # skip together: a rank alone in the step's all-reduce would wait forever
                    empty = bool(dist_utils.all_reduce_sum(torch.tensor([float(empty)], device=self.device)) > 0)
                if empty:
                    self.scheduler.step()
                    self.step += 1
                    continue
                log = self.step % max(1, cfg.train.log_every) == 0
                with self.amp_ctx():
                    loss, logs, loads = self.step_module(
                        images.to(self.device, memory_format=self.memory_format), targets, tasks
                    )
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: loss is {loss.item()} (tasks {tasks})")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                if cfg.optim.clip_grad > 0:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                lr = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                self.step += 1
                self.loss_history.append(loss.item())
                rep.step(self.step, {"total": loss.item(), **{k: v.item() for k, v in logs.items()}}, lr, log)
                if log:
                    rep.expert_load(self.step, loads)
                if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0 and self.step < total:
                    rep.checkpoint(self.step, self.save())
                if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < total:
                    self._evaluate_and_report(rep)
            # the finished run is written before anything can fail: checkpoint, metrics, then the bad-sample limit
            ckpt = self.save()
            routing: dict = {}
            metrics = self.evaluate(routing)
            wall = time.perf_counter() - t0
            rep.evaluation(
                self.step,
                metrics,
                {"train_seconds": round(wall, 1), "bad_samples": self.bad.count, "samples_seen": self.bad.seen},
            )
            rep.routing_heatmaps(self.step, routing, self._moe_layer_names())
            if self.bad.count:
                rep.message(
                    f"{self.bad.count} of {self.bad.seen} samples were unreadable and skipped "
                    f"(first: {self.bad.bad[0]})"
                )
            rep.message(
                f"\nfinal metrics after {self.step} steps ({wall / 60:.1f} min), held-out split:\n" + table(metrics)
            )
            if self.main and getattr(self.model, "classifier_routed", False):
                routes = evaluate_routes(
                    self.model,
                    self._val_loaders(),
                    self.device,
                    cfg.train.eval_max_batches,
                    self.amp_ctx,
                    cfg.data.crop_border,
                )
                (self.out_dir / "routes.json").write_text(json.dumps(routes, indent=1), encoding="utf-8")
                rep.message(
                    "\nrouted by the classifier, forced to the true and to a wrong degradation:\n"
                    + format_routes_table(routes)
                )
            try:
                self.bad.check(final=True)
            except TooManyBadSamples as e:
                raise TooManyBadSamples(f"{e} (the final checkpoint {ckpt} and metrics.json were written)") from None
        finally:
            rep.close()
        return metrics


def schedule_text(cfg: Config, total: int) -> str:
    """``data.size_schedule`` in words: ``"48 px for steps 0-2099, 64 px for steps 2100-2399; evaluation at 64 px"``."""
    starts = [0] + [s for s, _ in cfg.data.size_schedule if 0 < s < total]
    ends = starts[1:] + [total]
    parts = [
        f"{train_size_at(cfg.data.size_schedule, a, cfg.model.img_size)} px for steps {a}-{b - 1}"
        for a, b in zip(starts, ends)
    ]
    return ", ".join(parts) + f"; evaluation at {cfg.model.img_size} px"


def table(metrics: dict[str, dict[str, float]]) -> str:
    """The final metrics as a plain-text table (restoration: input and output PSNR / SSIM per degradation; a
    multi-task model with degradation tasks: both tables)."""
    restored = {t: m for t, m in metrics.items() if is_restoration(t)}
    other = {t: m for t, m in metrics.items() if not is_restoration(t)}
    tables = [format_table(other, {t: get_task(t).primary for t in other})] if other or not restored else []
    return "\n\n".join(tables + ([format_restoration_table(restored)] if restored else []))


def val_loaders(
    cfg: Config, tasks: list[str] | None = None, roots: dict[int, Path] | None = None, progress: bool = False
) -> dict[str, tuple[Any, Any]]:
    """task -> (held-out loader, dataset) for every task of ``cfg`` (or ``tasks``): the datasets of
    :func:`~vision_moe.engine.evaluator.task_datasets`, one loader per dataset (tasks labelled by one dataset
    share it). ``roots``: dataset index -> where its data is now; ``progress``: a bar if built-in data has to be
    generated."""
    loaders: dict[int, Any] = {}
    out: dict[str, tuple[Any, Any]] = {}
    for t, ds in task_datasets(cfg, tasks, "val", roots=roots, progress=progress).items():
        if id(ds) not in loaders:
            loaders[id(ds)] = heldout_loader(cfg, ds)
        out[t] = (loaders[id(ds)], ds)
    return out


def train(cfg: Config, out_dir: str | Path, resume: bool = False) -> dict[str, dict[str, float]]:
    """Train ``cfg`` into ``out_dir`` (``--resume`` continues from its newest checkpoint); returns final metrics."""
    try:
        return Trainer(cfg, out_dir, resume).fit()
    finally:
        dist_utils.cleanup()


def _eval_data_root(checkpoint: str | Path, i: int, dcfg: Any, cfg: Config, data_root: str | Path | None) -> Path:
    """Where the held-out data of ``cfg.data.datasets[i]`` is: ``data_root`` if given, else the root the checkpoint
    stored (absolute since roots are stored so; a relative one, from older checkpoints, is taken from the current
    folder). A missing dataset is an error naming it; missing built-in data is generated (deterministic: the same
    images), never silently."""
    from ..data.builtin import builtin_dir

    root = Path(data_root if data_root is not None else dcfg.root).expanduser()
    given = "--data-root" if data_root is not None else f"data.datasets[{i}].root"
    if dcfg.format == "builtin_restore":  # generated on first use where it is missing (deterministic)
        return root
    if dcfg.format != "builtin":
        if not root.exists():
            raise ValueError(
                f"{checkpoint}: {given} {root}: not found; expected the {dcfg.format} dataset the checkpoint was "
                "trained on" + ("" if data_root is not None else " (tools/eval.py --data-root names where it is now)")
            )
        return root
    folder = builtin_dir(root, dcfg.seed, dcfg.num_train, dcfg.num_val, cfg.model.img_size)
    if not (folder / "manifest.json").is_file():
        _logger.warning(
            "%s: its built-in data is not in %s (%s); generating it there: %d + %d images, the same as in training%s",
            checkpoint,
            folder,
            given,
            dcfg.num_train,
            dcfg.num_val,
            "" if data_root is not None else " (tools/eval.py --data-root names a copy elsewhere)",
        )
    return root


def evaluate_checkpoint_tasks(
    checkpoint: str | Path,
    tasks: list[str] | None = None,
    max_batches: int | None = None,
    device: str = "auto",
    capacity_factor: float | None = None,
    data_root: str | Path | None = None,
    progress: bool = False,
    backbone_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of ``tasks`` (default: all of the checkpoint's) on their held-out splits, exactly as the trainer
    computes them: task -> metrics.

    ``capacity_factor``: evaluate with that per-image expert capacity (V-MoE's inference capacity; what a
    capacity-bounded export runs) instead of the checkpoint's own setting; adds ``moe_dropped_fraction``.
    ``data_root``: where the task's dataset is now (default: the root stored in the checkpoint); for the built-in
    data, the folder holding it or its parent. ``progress``: a tqdm bar if the built-in data has to be generated.
    ``backbone_fn``: evaluate the model with its backbone replaced by ``backbone_fn(backbone)`` (e.g. a fixed-point
    model of it) under the same heads; adds ``agreement_<metric>`` against the checkpoint's own model."""
    from ..config import config_from_dict

    dev = resolve_device(device)
    model, mc = load_model(
        checkpoint,
        require=("experiment",),
        why="tools/eval.py rebuilds the held-out data from this training config; tools/export.py works without it",
    )
    exp = dict(mc["experiment"])
    cfg = config_from_dict(exp, str(checkpoint))
    tasks = list(model.tasks) if tasks is None else list(tasks)
    for task in tasks:
        if task not in model.tasks:
            raise ValueError(f"unknown task {task!r}; this checkpoint has {list(model.tasks)}")
    if capacity_factor is not None:
        model.set_capacity(capacity_factor=capacity_factor)
    model.to(dev)
    if cfg.train.channels_last:  # the layout the trainer evaluated with: the same convolution kernels, same numbers
        model.to(memory_format=torch.channels_last)
    datasets = [i for i, d in enumerate(cfg.data.datasets) if any(t in (d.tasks or cfg.tasks) for t in tasks)]
    missing = [t for t in tasks if not any(t in (d.tasks or cfg.tasks) for d in cfg.data.datasets)]
    if missing:
        raise ValueError(f"no dataset in the checkpoint's config labels task {missing[0]!r}")
    if data_root is not None and len(datasets) > 1:
        raise ValueError(
            f"{checkpoint}: --data-root with tasks {tasks} read from {len(datasets)} datasets; name one task"
        )
    roots = {i: _eval_data_root(checkpoint, i, cfg.data.datasets[i], cfg, data_root) for i in datasets}
    loaders = val_loaders(cfg, tasks, roots=roots, progress=progress)
    mb = cfg.train.eval_max_batches if max_batches is None else max_batches
    reference = None
    if backbone_fn is not None:
        reference, model = model, copy.copy(model)
        model._modules = dict(model._modules)  # the reference keeps its own backbone
        model.backbone = backbone_fn(reference.backbone)
    amp = _amp_ctx(cfg, dev)
    return {
        t: evaluate_task(
            model, t, *loaders[t], mc["model"]["tasks"][t], dev, mb, amp, cfg.data.crop_border, reference=reference
        )
        for t in tasks
    }


def evaluate_checkpoint(
    checkpoint: str | Path,
    task: str,
    max_batches: int | None = None,
    device: str = "auto",
    capacity_factor: float | None = None,
    data_root: str | Path | None = None,
    progress: bool = False,
    backbone_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, float]:
    """Metrics of ``task`` for a checkpoint on its held-out split (see :func:`evaluate_checkpoint_tasks`)."""
    return evaluate_checkpoint_tasks(
        checkpoint, [task], max_batches, device, capacity_factor, data_root, progress, backbone_fn
    )[task]
