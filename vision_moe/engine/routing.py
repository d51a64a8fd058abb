"""How a task-conditioned MoE model routes: per-task expert load, task-expert mutual information, the experts a task
really uses (Mod-Squad's pruning view), FLOPs and parameters per task, heatmaps (matplotlib) and the page
``tools/analyze_routing.py`` writes; the trainer sends the same heatmaps to TensorBoard at each evaluation.

Definitions (stated on the page too): the *load* of expert e for task t in a layer is the share of t's top-k
assignments that go to e (after any capacity drop), on the images analysed; the *mutual information* is
I(T; E) in bits between the task (uniform over the tasks) and the expert of an assignment, from those shares; the
*experts needed for q of the routing mass* is the smallest number of experts whose shares add up to q.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "RoutingStats",
    "collect_routing",
    "add_expert_loads",
    "mutual_information",
    "experts_needed",
    "count_flops",
    "task_costs",
    "heatmap_figure",
    "write_report",
    "log_heatmaps",
]

MASSES = (0.9, 0.99)


def add_expert_loads(acc: dict[str, list[torch.Tensor]], task: str, aux: Sequence) -> None:
    """Add one forward's assignments per expert (one (E,) count per MoE layer, forward order) to ``acc[task]``."""
    rows = [a.expert_load.detach().cpu().double() for a in aux]
    acc[task] = [a + r for a, r in zip(acc[task], rows)] if task in acc else rows


def mutual_information(load: torch.Tensor) -> float:
    """I(T; E) in bits of a (T, E) table of assignment counts, the tasks weighted equally."""
    p_e_t = load / load.sum(1, keepdim=True).clamp_min(1e-300)  # (T, E) p(e | t)
    joint = p_e_t / load.shape[0]  # p(t, e) with p(t) = 1 / T
    p_e = joint.sum(0, keepdim=True)
    p_t = joint.sum(1, keepdim=True)
    nz = joint > 0
    return float((joint[nz] * torch.log2(joint[nz] / (p_t.expand_as(joint)[nz] * p_e.expand_as(joint)[nz]))).sum())


def experts_needed(shares: torch.Tensor, mass: float) -> int:
    """The smallest number of experts whose shares (E,) add up to ``mass`` of the total."""
    s = torch.sort(shares.double() / shares.sum().clamp_min(1e-300), descending=True).values
    return int(torch.searchsorted(torch.cumsum(s, 0), torch.tensor([mass - 1e-12], dtype=s.dtype)).item()) + 1


@dataclass
class RoutingStats:
    """Assignments per expert of each MoE layer for each task: ``counts[task][layer]`` is (experts,)."""

    layers: list[str]
    counts: dict[str, list[torch.Tensor]]
    images: dict[str, int]

    @property
    def tasks(self) -> list[str]:
        return list(self.counts)

    def table(self, layer: int) -> torch.Tensor:
        """(T, E) assignment counts of one layer."""
        return torch.stack([self.counts[t][layer] for t in self.tasks])

    def shares(self, layer: int) -> torch.Tensor:
        """(T, E) share of each task's assignments per expert in one layer (rows sum to 1)."""
        t = self.table(layer)
        return t / t.sum(1, keepdim=True).clamp_min(1e-300)

    def summary(self) -> dict[str, Any]:
        """Every number of the page, JSON-ready."""
        out: dict[str, Any] = {"tasks": self.tasks, "layers": self.layers, "images": self.images, "per_layer": []}
        for li, name in enumerate(self.layers):
            sh = self.shares(li)
            out["per_layer"].append(
                {
                    "layer": name,
                    "load": {t: sh[ti].tolist() for ti, t in enumerate(self.tasks)},
                    "assignments": {t: self.table(li)[ti].tolist() for ti, t in enumerate(self.tasks)},
                    "mutual_information_bits": mutual_information(self.table(li)),
                    "experts_needed": {
                        t: {str(m): experts_needed(sh[ti], m) for m in MASSES} for ti, t in enumerate(self.tasks)
                    },
                }
            )
        return out

    def keep_masks(self, task: str, mass: float, top_k: Sequence[int]) -> list[torch.Tensor]:
        """Per layer, the experts covering ``mass`` of ``task``'s assignments (at least the layer's top_k)."""
        masks = []
        for li, k in enumerate(top_k):
            sh = self.counts[task][li]
            n = max(k, experts_needed(sh, mass))
            order = torch.sort(sh, descending=True, stable=True).indices
            masks.append(torch.zeros(sh.numel(), dtype=torch.bool).index_fill_(0, order[:n], True))
        return masks


@torch.no_grad()
def collect_routing(
    backbone: nn.Module, batches: Iterable[tuple[str, torch.Tensor]], device: torch.device | str = "cpu"
) -> RoutingStats:
    """Route ``(task, images (B, 3, H, W))`` batches through ``backbone`` (eval mode) and count assignments."""
    was = backbone.training
    backbone.eval()
    acc: dict[str, list[torch.Tensor]] = {}
    images: dict[str, int] = {}
    try:
        for task, x in batches:
            _, aux = backbone.forward_features(x.to(device), task, return_aux=True)
            add_expert_loads(acc, task, aux)
            images[task] = images.get(task, 0) + x.shape[0]
    finally:
        backbone.train(was)
    return RoutingStats([n for n, _ in backbone.moe_layers()], acc, images)


def count_flops(fn, *args) -> int:
    """FLOPs of ``fn(*args)`` counted by ``torch.utils.flop_counter`` (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    return int(counter.get_total_flops())


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def task_costs(model: nn.Module, stats: RoutingStats, image: torch.Tensor, mass: float = 0.99) -> dict[str, dict]:
    """Per task: parameters and FLOPs (one image) of the full multi-task model, of ``specialize(task)``, and of the
    Mod-Squad-pruned model that keeps, in each MoE layer, the experts covering ``mass`` of the task's assignments.
    ``model`` is a multi-task model (backbone + heads) or a backbone alone."""
    backbone = getattr(model, "backbone", model)
    heads = hasattr(model, "heads")
    top_k = [m.top_k for _, m in backbone.moe_layers()]
    x = image[None] if image.dim() == 3 else image[:1]

    def run(m: nn.Module, task: str | None):
        if task is None:  # a specialised model
            return m(x) if heads else m.forward_features(x)
        return m(x, task) if heads else m.forward_features(x, task)

    was = model.training
    model.eval()
    out = {}
    try:
        for task in stats.tasks:
            spec = model.specialize(task).eval()
            pruned = copy.deepcopy(model).eval()
            getattr(pruned, "backbone", pruned).restrict_experts(task, stats.keep_masks(task, mass, top_k))
            pruned = pruned.specialize(task).eval()
            out[task] = {
                "full": {"params": _params(model), "flops": count_flops(run, model, task)},
                "specialised": {"params": _params(spec), "flops": count_flops(run, spec, None)},
                "pruned": {"params": _params(pruned), "flops": count_flops(run, pruned, None), "mass": mass},
            }
    finally:
        model.train(was)
    return out


def heatmap_figure(shares: torch.Tensor, tasks: Sequence[str], title: str):
    """A task x expert heatmap (matplotlib Figure) of routing shares (T, E)."""
    from matplotlib.figure import Figure

    t, e = shares.shape
    fig = Figure(figsize=(max(4.0, 0.45 * e + 1.8), max(1.6, 0.45 * t + 1.0)), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(shares.float().numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(e), [str(i) for i in range(e)], fontsize=7)
    ax.set_yticks(range(t), list(tasks), fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="share of assignments")
    fig.tight_layout()
    return fig


def log_heatmaps(writer, step: int, stats: RoutingStats) -> None:
    """Every MoE layer's task x expert heatmap to a TensorBoard ``SummaryWriter`` (tag ``routing/<layer>``)."""
    for li, name in enumerate(stats.layers):
        writer.add_figure(f"routing/{name}", heatmap_figure(stats.shares(li), stats.tasks, name), step)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{esc(table_id)}"><tr>{head}</tr>{body}</table>'


def write_report(
    out_dir: str | Path, stats: RoutingStats, costs: Mapping[str, dict] | None = None, title: str = "routing report"
) -> Path:
    """Write the heatmaps (``heatmap_<layer>.png``), ``routing.json`` and ``report.html`` (one self-contained page:
    the PNGs are embedded) into ``out_dir``; returns the page's path. Shares are printed with 4 decimals, MI with 4,
    GFLOPs with 4, parameters in millions with 4."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = stats.summary()
    if costs is not None:
        summary["costs"] = dict(costs)
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>Load: share of a task's top-k assignments each expert receives (after any capacity drop). Mutual "
        "information: I(task; expert) in bits, tasks weighted equally (at most log2 of the number of tasks). Experts "
        "needed: the fewest experts whose shares add up to 90 % / 99 % of the task's assignments (Mod-Squad's "
        "pruning view). Images per task: "
        + html.escape(", ".join(f"{t} {n}" for t, n in stats.images.items()))
        + ".</p>",
    ]
    mi_rows = []
    for li, name in enumerate(stats.layers):
        sh = stats.shares(li)
        fig = heatmap_figure(sh, stats.tasks, name)
        png = _png(fig)
        (out / f"heatmap_{name}.png").write_bytes(png)
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        parts.append(
            _table(
                f"load-{name}",
                ["task", *[f"e{e}" for e in range(sh.shape[1])]],
                [[t, *(f"{v:.4f}" for v in sh[ti].tolist())] for ti, t in enumerate(stats.tasks)],
            )
        )
        mi_rows.append([name, f"{mutual_information(stats.table(li)):.4f}"])
    parts.append("<h2>Task-expert mutual information</h2>")
    parts.append(_table("mutual-information", ["layer", "MI (bits)"], mi_rows))
    parts.append(f"<p>Upper bound log2({len(stats.tasks)}) = {math.log2(max(1, len(stats.tasks))):.4f} bits.</p>")
    parts.append("<h2>Experts needed</h2>")
    rows = []
    for li, name in enumerate(stats.layers):
        sh = stats.shares(li)
        for ti, t in enumerate(stats.tasks):
            rows.append([name, t, *(experts_needed(sh[ti], m) for m in MASSES), sh.shape[1]])
    parts.append(_table("experts-needed", ["layer", "task", "90 %", "99 %", "experts"], rows))
    if costs:
        parts.append("<h2>Parameters and FLOPs per task</h2>")
        parts.append(
            "<p>Counted by torch.utils.flop_counter (2 FLOPs per multiply-add) on one image; full = the multi-task "
            "model run for the task, specialised = model.specialize(task), pruned = the experts covering 99 % of "
            "the task's assignments kept (Mod-Squad), then specialised.</p>"
        )
        rows = [
            [t, kind, f"{c[kind]['params'] / 1e6:.4f}", f"{c[kind]['flops'] / 1e9:.4f}"]
            for t, c in costs.items()
            for kind in ("full", "specialised", "pruned")
        ]
        parts.append(_table("costs", ["task", "model", "params (M)", "GFLOPs"], rows))
    style = (
        "body{font-family:sans-serif;margin:2em} table{border-collapse:collapse;margin:.5em 0} "
        "td,th{border:1px solid #999;padding:2px 6px;font-size:12px}"
    )
    page = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )
    (out / "routing.json").write_text(json.dumps(summary, indent=2))
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def held_out_batches(cfg, tasks: Sequence[str], max_images: int) -> Iterable[tuple[str, torch.Tensor]]:
    """``(task, images)`` batches of each task's held-out split (the first dataset of ``cfg`` that labels it), at
    most ``max_images`` images per task; unreadable images are skipped."""
    from ..config import dataset_tasks
    from ..data import SkipBadSamples, collate_multitask
    from .data import build_dataset

    for task in tasks:
        dcfg = next((d for d in cfg.data.datasets if task in dataset_tasks(d, cfg.tasks)), None)
        if dcfg is None:
            raise ValueError(f"no dataset in the config labels task {task!r}")
        ds = build_dataset(dcfg, cfg, dcfg.val_split, train=False, tasks=dataset_tasks(dcfg, cfg.tasks))
        loader = torch.utils.data.DataLoader(
            SkipBadSamples(ds), batch_size=cfg.data.eval_batch_size, shuffle=False, collate_fn=collate_multitask
        )
        seen = 0
        for images, _ in loader:
            if seen >= max_images:
                break
            images = images[: max_images - seen]
            seen += images.shape[0]
            if images.shape[0]:
                yield task, images
