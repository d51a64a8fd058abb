"""tools/analyze_routing.py: every figure and the page are written, and the page's numbers equal a direct
computation; the trainer sends the same heatmaps to TensorBoard at each evaluation."""

import copy
import html.parser
import math

import numpy as np
import pytest
import torch
import yaml
from test_train import tiny
from tool_loader import tool_main
from torch.utils.flop_counter import FlopCounterMode

from vision_moe import save_pretrained
from vision_moe.config import config_from_dict
from vision_moe.data import collate_multitask
from vision_moe.engine import latest_checkpoint, load_model
from vision_moe.engine.data import build_dataset
from vision_moe.engine.trainer import Trainer

N_IMAGES = 5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two training steps, evaluated after each, with TensorBoard on."""
    data_root, out = tmp_path_factory.mktemp("builtin"), tmp_path_factory.mktemp("run")
    cfg = tiny(data_root, train={"steps": 2, "eval_every": 1, "tensorboard": True})
    Trainer(config_from_dict(cfg), out).fit()
    return out, cfg


def test_training_sends_routing_heatmaps_to_tensorboard_at_each_evaluation(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run
    ev = EventAccumulator(str(out / "tb"), size_guidance={"images": 0}).Reload()
    assert ev.Tags()["images"] == ["routing/blocks.1.mlp"]  # the one MoE layer of the tiny model
    images = ev.Images("routing/blocks.1.mlp")
    assert [i.step for i in images] == [1, 2] and all(i.encoded_image_string[:4] == b"\x89PNG" for i in images)


class _Tables(html.parser.HTMLParser):
    """The page's tables by id: lists of rows of cell texts (header first)."""

    def __init__(self):
        super().__init__()
        self.tables, self._cur, self._row, self._cell = {}, None, None, None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._cur = self.tables.setdefault(dict(attrs)["id"], [])
        elif tag == "tr" and self._cur is not None:
            self._row = []
            self._cur.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "table":
            self._cur = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _mi_bits(counts: np.ndarray) -> float:
    p = counts / counts.sum(1, keepdims=True) / counts.shape[0]
    pe, pt = p.sum(0), p.sum(1)
    return sum(
        p[t, e] * math.log2(p[t, e] / (pt[t] * pe[e])) for t in range(p.shape[0]) for e in range(p.shape[1]) if p[t, e]
    )


def _needed(shares: np.ndarray, mass: float) -> int:
    return int(np.argmax(np.cumsum(np.sort(shares)[::-1]) >= mass - 1e-12)) + 1


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops()


def test_report_page_numbers_equal_a_direct_computation(run, tmp_path, capsys):
    out, cfg_dict = run
    ck = latest_checkpoint(out)
    tool = tool_main("analyze_routing")
    assert tool(["--checkpoint", str(ck), "--out", str(tmp_path / "r"), "--max-images", str(N_IMAGES)]) == 0
    assert f"wrote {tmp_path / 'r' / 'report.html'}" in capsys.readouterr().out
    page = (tmp_path / "r" / "report.html").read_text()
    assert (tmp_path / "r" / "heatmap_blocks.1.mlp.png").read_bytes()[
        :4
    ] == b"\x89PNG" and "data:image/png;base64," in page
    assert (tmp_path / "r" / "routing.json").is_file()
    tables = _Tables()
    tables.feed(page)
    t = tables.tables
    model = load_model(ck)[0].eval()
    cfg = config_from_dict(cfg_dict)
    ds = build_dataset(cfg.data.datasets[0], cfg, "val", train=False)
    x, _ = collate_multitask([ds[i] for i in range(N_IMAGES)])
    tasks = list(model.tasks)
    counts = np.stack([model.backbone.expert_usage(x, task)[0].double().numpy() for task in tasks])  # (T, E)
    shares = counts / counts.sum(1, keepdims=True)
    load = t["load-blocks.1.mlp"]
    assert load[0] == ["task", "e0", "e1", "e2", "e3"]
    assert [r[0] for r in load[1:]] == tasks
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:]] for r in load[1:]]), shares, atol=5e-5)
    assert t["mutual-information"][1] == ["blocks.1.mlp", f"{_mi_bits(counts):.4f}"]
    for row in t["experts-needed"][1:]:
        ti = tasks.index(row[1])
        assert row[2:] == [str(_needed(shares[ti], 0.9)), str(_needed(shares[ti], 0.99)), "4"], row
    costs = {(r[0], r[1]): (float(r[2]), float(r[3])) for r in t["costs"][1:]}
    x1 = x[:1]
    for ti, task in enumerate(tasks):
        spec = model.specialize(task).eval()
        pruned = copy.deepcopy(model)
        n = max(2, _needed(shares[ti], 0.99))
        keep = torch.zeros(4, dtype=torch.bool)
        keep[torch.sort(torch.from_numpy(counts[ti]), descending=True, stable=True).indices[:n]] = True
        pruned.backbone.restrict_experts(task, [keep])
        pruned = pruned.specialize(task).eval()
        for kind, m, args in (("full", model, (x1, task)), ("specialised", spec, (x1,)), ("pruned", pruned, (x1,))):
            params = sum(p.numel() for p in m.parameters()) / 1e6
            flops = _flops(lambda m=m, args=args: m(*args))
            assert costs[(task, kind)] == (round(params, 4), round(flops / 1e9, 4)), (task, kind)
        assert costs[(task, "pruned")][0] <= costs[(task, "specialised")][0] < costs[(task, "full")][0]


def test_model_and_data_sources_and_bad_input(run, tmp_path, capsys):
    out, cfg_dict = run
    cfg_file = tmp_path / "exp.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg_dict))
    tool = tool_main("analyze_routing")
    backbone = load_model(latest_checkpoint(out))[0].backbone
    save_pretrained(backbone, tmp_path / "hub")  # a backbone in the Hub format, routed on the config's data
    src = f"local-dir:{tmp_path / 'hub'}"
    assert tool(["--model", src, "--pretrained", "--data", str(cfg_file), "--out", str(tmp_path / "m")]) == 0
    page = (tmp_path / "m" / "report.html").read_text()
    assert page.count("<h2>blocks.") == 1 and (tmp_path / "m" / "heatmap_blocks.1.mlp.png").is_file()
    assert f"routing of {src}" in page
    capsys.readouterr()
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    assert tool(["--checkpoint", str(stray), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith(f"error: {stray}: a file, not a checkpoint folder; expected a folder with config.json")
        and "\n" not in err
    )
    weights = latest_checkpoint(out) / "model.safetensors"  # the weights file of a checkpoint: its folder is meant
    assert tool(["--checkpoint", str(weights), "--out", str(tmp_path / "w"), "--max-images", "1"]) == 0
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_in_the_hub_format_evaluates_as_the_checkpoint(run, tmp_path, capsys):
    """tools/convert.py to-hub keeps the training config: tools/eval.py on the Hub folder prints the same metrics."""
    out, _ = run
    ck = latest_checkpoint(out)
    assert tool_main("convert")(["to-hub", "--checkpoint", str(ck), "--out", str(tmp_path / "hub")]) == 0
    capsys.readouterr()
    evaluate = tool_main("eval")
    assert evaluate(["--checkpoint", str(ck), "--task", "semseg"]) == 0
    want = capsys.readouterr().out
    assert evaluate(["--checkpoint", str(tmp_path / "hub"), "--task", "semseg"]) == 0
    assert capsys.readouterr().out == want and "mIoU" in want
