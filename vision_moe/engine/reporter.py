"""Console progress (tqdm, ETA, per-task loss), TensorBoard scalars and metrics.json; rank 0 only."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from pathlib import Path

from .checkpoint import atomic_write_text

__all__ = ["Reporter", "format_table", "format_restoration_table", "format_routes_table"]

_logger = logging.getLogger(__name__)


def format_table(metrics: dict[str, dict[str, float]], primary: dict[str, str] | None = None) -> str:
    """A plain-text table: one row per task, its headline metric first."""
    rows = []
    for task, m in metrics.items():
        keys = sorted(m, key=lambda k: (k != (primary or {}).get(task), k))
        rows.append((task, "  ".join(f"{k}={m[k]:.4f}" for k in keys)))
    w = max([len("task")] + [len(r[0]) for r in rows])
    lines = [f"{'task':<{w}}  metrics", f"{'-' * w}  {'-' * 40}"]
    lines += [f"{t:<{w}}  {v}" for t, v in rows]
    return "\n".join(lines)


def format_restoration_table(metrics: dict[str, dict[str, float]]) -> str:
    """Per degradation and over all held-out images: PSNR / SSIM of the degraded input and of the output (RGB,
    the crop border stated), and the output's Y-channel PSNR."""
    from ..metrics.restoration import restoration_summary

    rows = dict(metrics)
    summary = restoration_summary(metrics)
    w = max([len("degradation"), len("mean (all images)")] + [len(t) for t in rows])
    head = (
        f"{'degradation':<{w}}  {'images':>6}  {'input PSNR':>10}  {'output PSNR':>11}  {'gain':>6}  "
        f"{'input SSIM':>10}  {'output SSIM':>11}  {'PSNR-Y':>6}"
    )
    lines = [head, "-" * len(head)]

    def row(name: str, m: dict[str, float]) -> str:
        return (
            f"{name:<{w}}  {int(m.get('images', 0)):>6}  {m.get('input_psnr', float('nan')):>10.2f}  "
            f"{m.get('psnr', float('nan')):>11.2f}  {m.get('psnr', 0) - m.get('input_psnr', 0):>+6.2f}  "
            f"{m.get('input_ssim', float('nan')):>10.4f}  {m.get('ssim', float('nan')):>11.4f}  "
            f"{m.get('psnr_y', float('nan')):>6.2f}"
        )

    lines += [row(t, m) for t, m in rows.items()]
    if summary:
        lines += ["-" * len(head), row("mean (all images)", summary)]
        crop = int(next(iter(metrics.values())).get("crop_border", 0))
        lines.append(
            f"PSNR (dB) and SSIM on RGB in [0, 1], crop border {crop}; PSNR-Y: Y channel (BT.601). "
            f"Degradations not worse than their input: {int(summary['tasks_not_worse'])} of {int(summary['tasks'])}"
        )
        if "classifier_accuracy" in summary:
            lines.append(f"Degradation classifier accuracy (routing 'auto'): {summary['classifier_accuracy']:.4f}")
    return "\n".join(lines)


def format_routes_table(routes: dict[str, dict[str, float]]) -> str:
    """A classifier-routed model per degradation: PSNR of the input, routed by its classifier ('auto'), forced to
    the true degradation, forced to a wrong one (mean over the others; the worst in brackets), and the
    classifier's accuracy (see :func:`~vision_moe.engine.evaluator.evaluate_routes`)."""
    w = max([len("degradation")] + [len(t) for t in routes])
    head = (
        f"{'degradation':<{w}}  {'input':>6}  {'auto':>6}  {'forced true':>11}  {'forced wrong (worst)':>20}  "
        f"{'true - wrong':>12}  {'accuracy':>8}"
    )
    lines = [head, "-" * len(head)]
    for t, r in routes.items():
        worst = min((v for k, v in r.items() if k.startswith("psnr_wrong_")), default=float("nan"))
        lines.append(
            f"{t:<{w}}  {r['input_psnr']:>6.2f}  {r['psnr_auto']:>6.2f}  {r['psnr_forced']:>11.2f}  "
            f"{r['psnr_wrong']:>11.2f} ({worst:>6.2f})  {r['psnr_forced'] - r['psnr_wrong']:>+12.2f}  "
            f"{r['classifier_accuracy']:>8.3f}"
        )
    lines.append("PSNR (dB) on RGB in [0, 1], held-out images of each degradation")
    return "\n".join(lines)


class Reporter:
    ETA_WINDOW = 100  # steps the ETA's pace is measured over

    def __init__(
        self, out_dir: Path, total_steps: int, start_step: int, enabled: bool, progress: bool, tensorboard: bool
    ) -> None:
        self.out_dir, self.enabled = out_dir, enabled
        self.total = total_steps
        self.ema: dict[str, float] = {}
        self._load_layout = False  # the custom-scalars layout of the expert-load charts, written once
        self.history: list[dict] = []
        self.bar = self.writer = None
        self._warned_heatmaps = False
        self.t0 = time.perf_counter()
        # (step, time) of the last ETA_WINDOW steps: the ETA follows the current pace (a larger crop size after a
        # data.size_schedule switch, a slower phase) rather than the average since the start
        self._recent: deque[tuple[int, float]] = deque([(start_step, self.t0)], maxlen=self.ETA_WINDOW + 1)
        if not enabled:
            return
        mpath = out_dir / "metrics.json"
        if mpath.is_file():
            try:
                old = json.loads(mpath.read_text())
                self.history = [h for h in old.get("history", []) if h["step"] <= start_step]
            except (ValueError, AttributeError, KeyError, TypeError) as e:  # unreadable: keep it aside, start anew
                aside = mpath.with_name("metrics.json.unreadable")
                mpath.replace(aside)
                _logger.warning("%s: not a metrics file (%s); moved to %s, history starts empty", mpath, e, aside.name)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                _logger.warning("tensorboard is not installed; no TensorBoard logs")
            else:
                self.writer = SummaryWriter(str(out_dir / "tb"))

    def step(self, step: int, losses: dict[str, float], lr: float, log: bool) -> None:
        if not self.enabled:
            return
        self._recent.append((step, time.perf_counter()))
        for k, v in losses.items():
            self.ema[k] = v if k not in self.ema else 0.9 * self.ema[k] + 0.1 * v
        if self.bar is not None:
            self.bar.update(1)
            if log:
                shown = {k: f"{v:.3f}" for k, v in self.ema.items() if not k.startswith("moe")}
                self.bar.set_postfix(shown, refresh=False)
        if self.writer is not None and log:
            for k, v in losses.items():
                self.writer.add_scalar(f"loss/{k}", v, step)
            self.writer.add_scalar("lr", lr, step)

    def expert_load(self, step: int, loads: dict[str, list[list[float]]]) -> None:
        """``loads[task][layer][expert]`` = fraction of the task's assignments that went to that expert.

        Tags ``expert_load/<task>/layer<i>/e<j>`` in the run's one event file, and (TensorBoard's Custom Scalars
        tab) one chart per task and layer with a line per expert. ``add_scalars`` would make one run per
        (task, layer, expert): 288 runs for M³ViT-S."""
        if self.writer is None:
            return
        if not self._load_layout:
            layout = {
                f"expert_load/{task}": {
                    f"layer{li}": ["Multiline", [rf"^expert_load/{task}/layer{li}/e\d+$"]] for li in range(len(layers))
                }
                for task, layers in loads.items()
            }
            self.writer.add_custom_scalars(layout)
            self._load_layout = True
        for task, layers in loads.items():
            for li, row in enumerate(layers):
                for e, v in enumerate(row):
                    self.writer.add_scalar(f"expert_load/{task}/layer{li}/e{e}", v, step)

    def status(self, step: int) -> str:
        """``step 400/2900 (1.8 min, ETA 11.2 min; loss 0.812)``: the progress bar's content as one line."""
        elapsed = time.perf_counter() - self.t0
        (s0, t0), (s1, t1) = self._recent[0], self._recent[-1]
        pace = (t1 - t0) / (s1 - s0) if s1 > s0 else None  # seconds per step over the last ETA_WINDOW steps
        eta = f", ETA {pace * (self.total - step) / 60:.1f} min" if pace is not None and step < self.total else ""
        loss = f"; loss {self.ema['total']:.3f}" if "total" in self.ema else ""
        return f"step {step}/{self.total} ({elapsed / 60:.1f} min{eta}{loss})"

    def checkpoint(self, step: int, path: Path | None) -> None:
        """A line per checkpoint when there is no progress bar (logs, CI), so a long run is never silent."""
        if self.enabled and self.bar is None and path is not None:
            self.message(f"{self.status(step)}: checkpoint {path}")

    def routing_heatmaps(self, step: int, counts: dict, layers: list[str]) -> None:
        """Each MoE layer's task x expert heatmap of the evaluation's assignments to TensorBoard (needs matplotlib)."""
        if self.writer is None or not counts or not layers:
            return
        try:
            from .routing import RoutingStats, log_heatmaps

            log_heatmaps(self.writer, step, RoutingStats(layers, counts, {}))
        except ImportError as e:  # matplotlib is in the [train] extra
            if not self._warned_heatmaps:
                _logger.warning("no routing heatmaps in TensorBoard: %s", e)
                self._warned_heatmaps = True

    def evaluation(self, step: int, metrics: dict[str, dict[str, float]], extra: dict | None = None) -> None:
        if not self.enabled:
            return
        self.history.append({"step": step, "metrics": metrics, **(extra or {})})
        atomic_write_text(
            self.out_dir / "metrics.json", json.dumps({"latest": self.history[-1], "history": self.history}, indent=2)
        )
        if self.writer is not None:
            for task, m in metrics.items():
                for k, v in m.items():
                    self.writer.add_scalar(f"metrics/{task}/{k}", v, step)
        where = f"step {step}" if self.bar is not None else self.status(step)  # no bar: the line says the progress
        self.message(
            f"{where}: "
            + "; ".join(f"{t}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items()) for t, m in metrics.items())
        )

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
