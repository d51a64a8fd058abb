"""Export pipeline: every registered model x task to ONNX with ORT parity, multi-task graph, INT8/FP16, detection
decoding + NMS vs torchvision, TensorRT op checks and engine-build commands, the Jetson kit's NumPy pre/post."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import vision_moe
from vision_moe.deploy import (
    ExportConfig,
    ExportError,
    ParityError,
    TensorRTSupportError,
    check_static_graph,
    check_tensorrt_support,
    compare_outputs,
    export_model,
    export_onnx,
)
from vision_moe.deploy.onnx_export import FORBIDDEN_OPS
from vision_moe.deploy.prepost import load_images, preprocess
from vision_moe.models.multitask import build_multitask_model

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(depth=2, embed_dim=64, num_heads=4)
MOE = dict(num_experts=4, top_k=2, expert_hidden=64)


def _small(name: str, **kw) -> torch.nn.Module:
    extra = {} if name.startswith("vit_mtl") else dict(MOE)
    if name.startswith("modsquad"):
        extra["expert_heads"] = 2
    torch.manual_seed(0)
    return vision_moe.create_model(name, tasks=("a", "b"), img_size=(32, 48), num_classes=5, **SMALL, **extra, **kw)


def _small_detector() -> torch.nn.Module:
    """A small M³ViT with a 3-class FCOS head at 64 x 64 (seeded weights)."""
    torch.manual_seed(0)
    return build_multitask_model(
        "m3vit_tiny_patch16_224",
        {"detection": 3},
        img_size=(64, 64),
        **SMALL,
        **MOE,
        head_kwargs=dict(det_channels=32, det_num_convs=1),
    )


def _kit_prepost():
    spec = importlib.util.spec_from_file_location("kit_prepost", ROOT / "export" / "prepost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _assert_graph_equals_model(path, model, task: str, hw, batch: int = 3) -> None:
    """ONNX Runtime on ``path`` vs the original model's own forward (not the export copy the parity used)."""
    from vision_moe.deploy import ort_session

    x = np.random.default_rng(1).standard_normal((batch, 3, *hw)).astype(np.float32)
    (got,) = ort_session(path).run(None, {"images": x})
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x), task=task).numpy()
    assert np.abs(ref).max() > 1e-3
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def _assert_clean(report: dict) -> None:
    for task, e in report["tasks"].items():
        assert e["fp32"]["parity"]["outputs"], task
        for out, st in e["fp32"]["parity"]["outputs"].items():
            assert st["rel"] <= 1e-4, (task, out, st)
        assert not set(e["fp32"]["op_counts"]) & FORBIDDEN_OPS
        assert e["fp32"]["opset"] >= 17
        for v in ("10.3", "10.16"):
            assert e["fp32"]["tensorrt"][v]["ok"], e["fp32"]["tensorrt"][v]["errors"]


@pytest.mark.parametrize("name", vision_moe.list_models(family="vit"))
def test_every_model_and_task_exports_with_parity(name, tmp_path):
    """Batch 3, non-square 32x48; both tasks; the multi-task graph equals each per-task graph."""
    model = _small(name)
    rep = export_model(model, ExportConfig(out_dir=str(tmp_path), batch=3, multitask=True, parity_images=3))
    assert set(rep["tasks"]) == {"a", "b"}
    _assert_clean(rep)
    assert rep["tasks"]["a"]["fp32"]["io"]["inputs"]["images"] == [3, 3, 32, 48]
    assert rep["tasks"]["a"]["fp32"]["io"]["outputs"]["logits"] == [3, 5]
    mt = rep["multitask"]
    if not name.startswith("vit_mtl"):
        assert mt["io"]["inputs"]["task"] == [1]
    for t in ("a", "b"):
        assert mt["vs_per_task_graph"][t]["rel"] <= 1e-4
    if not name.startswith("vit_mtl"):  # the per-task graph holds one gate; the multi-task graph gathers by task
        assert "TopK" in rep["tasks"]["a"]["fp32"]["op_counts"] and "Gather" in mt["op_counts"]
    saved = json.loads((tmp_path / "export_report.json").read_text())
    assert saved["tasks"]["b"]["fp32"]["sha256"] == rep["tasks"]["b"]["fp32"]["sha256"]
    for t in ("a", "b"):  # each graph against the full model's own forward for its task
        _assert_graph_equals_model(tmp_path / f"{t}.onnx", model, t, (32, 48))


def test_square_dynamic_batch_1_and_3(tmp_path):
    model = _small("m3vit_tiny_patch16_224")
    rep = export_model(
        model,
        ExportConfig(
            out_dir=str(tmp_path), tasks=["b"], batch=1, dynamic_batch=True, img_size=(32, 32), parity_images=3
        ),
    )
    e = rep["tasks"]["b"]["fp32"]
    assert e["io"]["inputs"]["images"] == ["batch", 3, 32, 32]
    assert e["parity"]["batch"] == 1 and e["parity_batch_3"]["batch"] == 3
    assert e["parity_batch_3"]["outputs"]["logits"]["rel"] <= 1e-4
    # the report's parity is against the prepared copy the graph was traced from (position embedding baked for
    # 32x32, specialised, dense dispatcher); check the graph against the original model itself as well
    _assert_graph_equals_model(tmp_path / "b.onnx", model, "b", (32, 32))


@pytest.mark.parametrize("name", ["m3vit_tiny_patch16_224", "modsquad_small_patch16_224"])
def test_capacity_bounded_export(tmp_path, name):
    """--capacity-factor: the gather dispatcher in the graph (grouped Conv experts), per-image capacity so batch 1
    and 3 agree with torch through one dynamic-batch graph, the multi-task graph equals the per-task ones, the
    drops are reported, and the result differs from the dropless export (the capacity is really in the graph)."""
    from vision_moe.deploy import ort_session

    model = _small(name, global_pool="avg")  # pooled patch tokens: the class token is first in every queue
    cfg = dict(tasks=["a", "b"], batch=1, dynamic_batch=True, parity_images=3, multitask=True)
    rep = export_model(model, ExportConfig(out_dir=str(tmp_path / "cap"), capacity_factor=0.5, **cfg))
    _assert_clean(rep)
    e = rep["tasks"]["a"]
    assert e["fp32"]["parity_batch_3"]["outputs"]["logits"]["rel"] <= 1e-4
    r = e["routing"]
    assert r["dispatcher"] == "GatherDispatcher" and r["capacity_factor"] == 0.5
    n = r["tokens_per_image"]
    layers = dict(model.moe_layers())
    assert r["capacity_per_image"] == {
        k: int(np.ceil(0.5 * n * layers[k].top_k / layers[k].num_experts)) for k in r["capacity_per_image"]
    }
    assert 0 < r["dropped_fraction"] < 1
    assert "Conv" in e["fp32"]["op_counts"] and "ScatterElements" in e["fp32"]["op_counts"]
    assert all(v["rel"] <= 1e-4 for v in rep["multitask"]["vs_per_task_graph"].values())
    exact = export_model(model, ExportConfig(out_dir=str(tmp_path / "exact"), **cfg))
    assert exact["tasks"]["a"]["routing"]["dropped_fraction"] == 0
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 48)).astype(np.float32)
    a = ort_session(tmp_path / "cap" / "a.onnx").run(None, {"images": x})[0]
    b = ort_session(tmp_path / "exact" / "a.onnx").run(None, {"images": x})[0]
    assert np.abs(a - b).max() > 1e-3
    # the graph (gather dispatcher) against the original model with the same capacity (its own sort dispatcher)
    capped = copy.deepcopy(model).set_capacity(capacity_factor=0.5)
    _assert_graph_equals_model(tmp_path / "cap" / "a.onnx", capped, "a", (32, 48))
    with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0, got 0"):
        export_model(model, ExportConfig(out_dir=str(tmp_path / "bad"), capacity_factor=0.0))


def test_multitask_model_heads_int8_and_fp16(tmp_path):
    """MultiTaskModel with classification + dense heads: mixed-output multi-task graph, INT8 drop, FP16 parity."""
    torch.manual_seed(0)
    m = build_multitask_model(
        "m3vit_tiny_patch16_224",
        {"classification": 6, "semseg": 7, "depth": None},
        img_size=(32, 48),
        head="linear",
        **SMALL,
        **MOE,
    )
    rep = export_model(
        m,
        ExportConfig(
            out_dir=str(tmp_path),
            batch=1,
            precision="int8",
            multitask=True,
            calib_images=4,
            eval_images=4,
            parity_images=2,
        ),
    )
    _assert_clean(rep)
    assert rep["multitask"]["task_output"] == {"classification": "logits", "semseg": "out", "depth": "out"}
    for t, e in rep["tasks"].items():
        ev = e["int8"]["evaluation"]
        assert ev["images"] == 4 and ev["drop"] == pytest.approx(ev["fp32"] - ev["quantized"])
        # no labels here: agreement with the fp32 graph (fp32 = 100), which a calibrated INT8 graph keeps close to
        # (100 / 98.8 / 98.2). The TensorRT file is measured with the QDQ reference arithmetic (no integer
        # kernels), so the figure is the same on any CPU; ONNX Runtime's own kernels on x86 without VNNI saturate
        # on its 8-bit weights (50 / 87 / 86 measured on an AVX2 CPU)
        assert not ev["labelled"] and ev["measured_with"].startswith("estimate:")
        assert ev["fp32"] == 100.0 and 95.0 <= ev["quantized"] <= 100.0, (t, ev)
        ops = onnx.load(str(tmp_path / f"{t}.int8.onnx"))
        assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in ops.graph.node}
        assert e["int8"]["tensorrt"]["10.3"]["ok"]  # symmetric: zero points are 0, as TensorRT requires
    assert rep["tasks"]["depth"]["int8"]["evaluation"]["drop"] > 0  # continuous output: the INT8 graph was measured
    rep16 = export_model(
        m, ExportConfig(out_dir=str(tmp_path / "fp16"), tasks=["semseg"], precision="fp16", parity_images=2)
    )
    assert rep16["tasks"]["semseg"]["fp16"]["parity"]["outputs"]["out"]["rel"] <= 2e-2
    # the routers stay fp32 through and through: their ops float, no tensor between two of them through fp16
    g16 = onnx.load(str(tmp_path / "fp16" / rep16["tasks"]["semseg"]["fp16"]["path"])).graph
    gates = [n for n in g16.node if "/router/" in n.name and n.op_type in ("Gemm", "MatMul", "Softmax")]
    to = {n.output[0]: a.i for n in g16.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    assert gates  # the graph has routers (in fp32: the converter's block list)
    assert not [n.name for n in g16.node if to.get(n.output[0]) == 1 and to.get(n.input[0]) == 10]


def test_detection_decoding_and_both_nms_paths_match_torchvision(tmp_path):
    m = _small_detector()
    head = m.heads["detection"]
    head.score_thresh = 0.0  # random weights: keep candidates so NMS has work to do
    rep = export_model(m, ExportConfig(out_dir=str(tmp_path), batch=2, parity_images=2))
    _assert_clean(rep)
    e = rep["tasks"]["detection"]
    assert set(e["fp32"]["io"]["outputs"]) == {"boxes", "scores"}
    x = preprocess(load_images(None, 2), (64, 64))
    from vision_moe.deploy import ort_session
    from vision_moe.deploy.prepost import detection_postprocess

    boxes, scores = ort_session(tmp_path / "detection.onnx").run(None, {"images": x})
    spec = m.eval().specialize("detection").eval()
    with torch.no_grad():
        ref = spec.postprocess(spec(torch.from_numpy(x)), (64, 64))
    args = (e["level_counts"], e["score_thresh"], e["nms_thresh"], e["topk_candidates"], e["detections_per_img"])
    kit = _kit_prepost()
    for impl in (detection_postprocess, kit.detection_postprocess):  # library (torchvision ops) and Jetson NumPy
        got = impl(boxes, scores, *args)
        assert len(got) == len(ref) == 2  # one result per image
        for g, r in zip(got, ref):
            assert len(g["boxes"]) == len(r["boxes"]) > 0
            # same detections; order may differ between near-tied scores (fp32 ORT vs torch), so compare sorted
            og = np.lexsort((g["boxes"][:, 1].round(2), g["boxes"][:, 0].round(2), g["labels"]))
            orf = np.lexsort((r["boxes"][:, 1].numpy().round(2), r["boxes"][:, 0].numpy().round(2), r["labels"]))
            np.testing.assert_allclose(g["scores"][og], r["scores"].numpy()[orf], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(g["boxes"][og], r["boxes"].numpy()[orf], rtol=1e-4, atol=1e-3)
            np.testing.assert_array_equal(g["labels"][og], r["labels"].numpy()[orf])


def test_parity_failure_raises():
    ref = np.ones((2, 5), np.float32)
    compare_outputs([ref + 1e-6], [ref], ["logits"], 1e-4)
    with pytest.raises(ParityError, match="logits"):
        compare_outputs([ref + 1e-2], [ref], ["logits"], 1e-4)


def test_data_dependent_graph_is_rejected(tmp_path):
    class NonZero(torch.nn.Module):
        def forward(self, x):
            return torch.nonzero(x > 0).float().sum().reshape(1)

    proto = export_onnx(NonZero(), (torch.randn(2, 3),), tmp_path / "nz.onnx", input_names=["x"], output_names=["y"])
    with pytest.raises(ExportError, match="NonZero"):
        check_static_graph(proto)


def _graph(op: str, inputs, attrs=None, inits=(), opset=17):
    from onnx import TensorProto, helper

    node = helper.make_node(op, inputs, ["y"] + (["i"] if op == "TopK" else []), **(attrs or {}))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5000])
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if op == "TopK":
        outs.append(helper.make_tensor_value_info("i", TensorProto.INT64, None))
    g = helper.make_graph([node], "g", [x], outs, initializer=list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_tensorrt_op_table_and_restrictions():
    from onnx import numpy_helper

    k = lambda v: numpy_helper.from_array(np.array([v], np.int64), "k")  # noqa: E731
    assert check_tensorrt_support(_graph("TopK", ["x", "k"], inits=[k(16)])).errors == []
    with pytest.raises(TensorRTSupportError, match="3840"):
        check_tensorrt_support(_graph("TopK", ["x", "k"], inits=[k(4000)]))
    with pytest.raises(TensorRTSupportError, match="Unique"):
        check_tensorrt_support(_graph("Unique", ["x"]))
    rep = check_tensorrt_support(_graph("Relu", ["x"], opset=22), "10.3", raise_on_error=False)
    assert rep.errors and "opset 22" in rep.errors[0]
    assert check_tensorrt_support(_graph("Relu", ["x"], opset=22), "10.16").errors == []


def test_trtexec_command_and_script(tmp_path, monkeypatch):
    import vision_moe.deploy.tensorrt_build as tb
    from vision_moe.deploy.tensorrt_build import build_or_script, trtexec_command

    cmd = trtexec_command("a.onnx", "a.engine", "fp16", (32, 48), batch=2, dynamic_batch=True)
    assert "--fp16" in cmd and "--minShapes=images:1x3x32x48" in cmd and "--optShapes=images:2x3x32x48" in cmd
    assert "--int8" in trtexec_command("a.int8.onnx", "a.engine", "int8", (32, 48))
    assert "--stronglyTyped" in trtexec_command("a.fp16.onnx", "a.engine", "fp16", (32, 48), strongly_typed=True)
    (tmp_path / "a.onnx").write_bytes(b"")
    monkeypatch.setattr(tb, "tensorrt_available", lambda: (False, "script path under test"))  # also where TRT is
    res = build_or_script(tmp_path / "a.onnx", tmp_path / "a.fp16.engine", "fp16", (32, 48), 1, False)
    assert res["built"] is False and res["reason"] == "script path under test"
    assert not (tmp_path / "a.fp16.engine").exists() and res["script"] == "build_engine.sh"
    script = (tmp_path / "build_engine.sh").read_text()
    assert "--onnx=a.onnx --saveEngine=a.fp16.engine" in script and "--fp16" in script


def test_int8_multitask_engine_is_fp16_on_host_and_in_the_kit(tmp_path, monkeypatch):
    """The multi-task graph has no QDQ scales: an INT8 request builds it with FP16, and the host script, the
    report and the Jetson kit's build_engine.py all name it multitask.fp16.engine (what infer.py loads)."""
    import vision_moe.deploy.tensorrt_build as tb

    monkeypatch.setattr(tb, "tensorrt_available", lambda: (False, "script path under test"))  # also where TRT is
    model = _small("m3vit_tiny_patch16_224")
    rep = export_model(
        model,
        ExportConfig(
            out_dir=str(tmp_path), fmt="engine", precision="int8", multitask=True, calib_images=2, eval_images=2
        ),
    )
    eng = rep["multitask"]["engine"]
    assert (
        eng["built"] is False and "--saveEngine=multitask.fp16.engine" in eng["trtexec"] and "--fp16" in eng["trtexec"]
    )
    assert rep["multitask"]["engine_precision"]["int8"] == "fp16"
    spec = importlib.util.spec_from_file_location("kit_build_engine", ROOT / "export" / "build_engine.py")
    kit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kit)
    got = {p.name: prec for p, prec, _ in kit.graphs(tmp_path, "int8")}
    assert got == {"a.int8.onnx": "int8", "b.int8.onnx": "int8", "multitask.onnx": "fp16"}


def test_build_engine_api_sequence_with_mocked_tensorrt(tmp_path, monkeypatch):
    """MOCK: a fake ``tensorrt`` module records the TensorRT Python API calls; no engine is built or claimed."""
    calls = []

    class Rec:
        def __init__(self, name):
            self._n = name

        def __getattr__(self, item):
            def f(*a, **k):
                calls.append((f"{self._n}.{item}", a))
                if item == "parse_from_file":
                    return True
                if item == "build_serialized_network":
                    return b"serialized"
                if item == "create_timing_cache":
                    return Rec("cache")
                if item == "serialize":
                    return b"cache"
                return Rec(item)

            return f

    trt = types.SimpleNamespace(
        __version__="10.3-mock",
        Logger=lambda *a: None,
        Builder=lambda lg: Rec("builder"),
        OnnxParser=lambda net, lg: Rec("parser"),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="WS"),
        BuilderFlag=types.SimpleNamespace(FP16="FP16", INT8="INT8"),
    )
    trt.Logger.WARNING = 2
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    from vision_moe.deploy.tensorrt_build import build_engine

    res = build_engine(
        tmp_path / "a.int8.onnx",
        tmp_path / "a.engine",
        "int8",
        (32, 48),
        batch=2,
        dynamic_batch=True,
        timing_cache=tmp_path / "t.cache",
    )
    names = [c[0] for c in calls]
    assert names.index("parser.parse_from_file") < names.index("builder.build_serialized_network")
    for flag in ("FP16", "INT8"):
        assert ("create_builder_config.set_flag", (flag,)) in calls
    assert any(n.endswith("set_shape") for n in names) and "create_builder_config.add_optimization_profile" in names
    assert (tmp_path / "a.engine").read_bytes() == b"serialized" and res["tensorrt"] == "10.3-mock"


@pytest.mark.parametrize("use_cv2", [True, False])
def test_kit_preprocess_matches_library(use_cv2):
    kit = _kit_prepost()
    images = load_images(None, 4)
    for hw in [(32, 48), (64, 64)]:
        lib = preprocess(images, hw, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        got = kit.preprocess(images, hw, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), use_cv2=use_cv2)
        assert got.shape == lib.shape == (4, 3, *hw)
        if use_cv2:
            np.testing.assert_allclose(got, lib, rtol=0, atol=1e-5)  # same cv2 resize; float op order only
        else:  # float bilinear vs OpenCV's fixed-point: at most one grey level apart
            assert np.max(np.abs(got - lib)) <= 1.0 / (255 * 0.224) + 1e-5


def test_kit_nms_matches_torchvision():
    from torchvision.ops import batched_nms

    kit = _kit_prepost()
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (200, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(2, 20, (200, 2)).astype(np.float32)], 1)
    scores = rng.uniform(0, 1, 200).astype(np.float32)
    labels = rng.integers(0, 3, 200)
    ref = batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5).numpy()
    np.testing.assert_array_equal(kit.batched_nms(boxes, scores, labels, 0.5), ref)


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = ["--model", "m3vit_tiny_patch16_224", "--set", "depth=2", "--out", str(tmp_path / "o")]
    assert tool.main([*base, "--task", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown task 'nope'") and "\n" not in err
    assert tool.main([*base, "--task", "semseg", "--opset", "13"]) == 2
    assert "opset 13 is too old" in capsys.readouterr().err
    # a checkpoint whose config does not match its weights
    from vision_moe.engine.checkpoint import save_checkpoint

    m = build_multitask_model(
        "m3vit_tiny_patch16_224", {"classification": 6}, img_size=32, head="linear", **SMALL, **MOE
    )
    ck = save_checkpoint(tmp_path / "ck", m, dict(model=_small_model_cfg({"classification": 6})))
    c = json.loads((ck / "config.json").read_text())
    c["model"]["backbone_kwargs"]["embed_dim"] = 128
    (ck / "config.json").write_text(json.dumps(c))
    assert tool.main(["--checkpoint", str(ck), "--all-tasks", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "do not match" in err and "\n" not in err


def _small_model_cfg(tasks: dict) -> dict:
    """The 'model' section of a checkpoint's config.json for the small linear-head M³ViT these tests build."""
    return dict(
        backbone="m3vit_tiny_patch16_224",
        tasks=dict(tasks),
        img_size=32,
        head="linear",
        backbone_kwargs=dict(SMALL, **MOE),
    )


def _export_tool():
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool.main


@pytest.mark.parametrize(
    "args, needles",
    [
        (
            ["--set", "depth=two", "--task", "semseg"],
            ["--set depth=two", "cannot build the model", "--set values are JSON"],
        ),
        (["--set", "foo=1", "--all-tasks"], ["--set foo=1", "unexpected keyword argument 'foo'"]),
        (["--tasks-def", "{semseg: 3", "--task", "semseg"], ["--tasks-def '{semseg: 3': not valid JSON"]),
        (["--tasks-def", "[1]", "--task", "semseg"], ["--tasks-def '[1]': expected a non-empty JSON object"]),
        (["--tasks-def", '{"semseg": "x"}', "--task", "semseg"], ["task 'semseg' has 'x' classes"]),
        (["--img-size", "0", "0", "--all-tasks"], ["--img-size must be positive, got 0 0"]),
        (["--calib-images", "0", "--all-tasks", "--precision", "int8"], ["--calib-images must be >= 1, got 0"]),
        (["--eval-images", "-1", "--all-tasks", "--precision", "fp16"], ["--eval-images must be >= 1, got -1"]),
        (["--eval-images", "1", "--batch", "2", "--all-tasks", "--precision", "int8"], ["--eval-images must be >= 2"]),
        (["--capacity-factor", "inf", "--all-tasks"], ["capacity_factor must be a finite number > 0, got inf"]),
        (["--capacity-factor", "nan", "--all-tasks"], ["capacity_factor must be a finite number > 0, got nan"]),
        # flags that would be ignored are refused
        (["--calib-data", "x", "--all-tasks"], ["--calib-data acts only with --precision int8; got --precision fp32"]),
        (["--calib-images", "4", "--all-tasks", "--precision", "fp16"], ["--calib-images acts only with --precision"]),
        (["--int8-runtime", "onnxruntime", "--all-tasks"], ["--int8-runtime acts only with --precision int8"]),
        (["--data", "configs/quickstart.yaml", "--all-tasks"], ["--data acts only with --precision fp16 or int8"]),
        (["--eval-images", "4", "--all-tasks"], ["--eval-images acts only with --precision fp16 or int8"]),
        (["--head", "linear", "--all-tasks"], ["--head needs --tasks-def"]),
        (["--data", "nope.yaml", "--all-tasks", "--precision", "int8"], ["--data nope.yaml: not a file"]),
        # a model without heads is a classifier: its routing task 'semseg' is no segmentation graph
        (["--task", "semseg"], ["task 'semseg': this model has no task heads", "--tasks-def"]),
    ],
)
def test_export_tool_bad_arguments_give_one_line_errors_and_no_folder(tmp_path, capsys, args, needles):
    out = tmp_path / "new" / "o"
    base = ["--model", "m3vit_tiny_patch16_224", "--out", str(out)]
    if "--set" not in args:
        base += ["--set", "depth=1"]
    assert _export_tool()([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not (tmp_path / "new").exists()


def test_export_tool_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "taken"
    f.write_text("keep me")
    args = ["--model", "m3vit_tiny_patch16_224", "--set", "depth=1", "--all-tasks", "--out", str(f)]
    assert _export_tool()(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out {f}: exists and is not a folder; expected a folder (created if missing)"
    assert f.read_text() == "keep me"
    with pytest.raises(ValueError, match="exists and is not a folder"):
        export_model(_small("vit_mtl_tiny_patch16_224"), ExportConfig(out_dir=str(f)))
    with pytest.raises(ValueError, match="cannot create the folder"):  # a file where a parent folder should be
        export_model(_small("vit_mtl_tiny_patch16_224"), ExportConfig(out_dir=str(f / "sub")))


def test_export_config_rejects_bad_sizes(tmp_path):
    for kw, msg in [
        (dict(calib_images=0), "calib_images must be >= 1, got 0"),
        (dict(eval_images=0), "eval_images must be >= 1, got 0"),
        (dict(parity_images=0), "parity_images must be >= 1, got 0"),
        (dict(precision="int8", batch=4, calib_images=3), r"calib_images must be >= 4 \(the batch size"),
        (dict(img_size=(0, 32)), r"img_size must be two positive numbers \(H, W\), got \(0, 32\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            ExportConfig(out_dir=str(tmp_path / "o"), **kw).validate()


def _calib_folder(root: Path, good: int, bad: int) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    for i in range(bad):
        (root / f"bad{i}.png").write_bytes(b"\x89PNG not really")
    return root


def test_unreadable_calibration_images_are_skipped_and_reported(tmp_path, capsys, caplog):
    calib = _calib_folder(tmp_path / "calib", good=3, bad=1)
    skipped: list[str] = []
    imgs = load_images(calib, 5, skipped=skipped)
    assert len(imgs) == 5 and all(i.shape == (32, 48, 3) for i in imgs)  # cycled over the 3 readable ones
    assert len(skipped) == 1 and skipped[0].startswith(f"{calib / 'bad0.png'}: ")
    assert "skipping unreadable image" in caplog.text
    rep = export_model(
        _small("m3vit_tiny_patch16_224"),
        ExportConfig(
            out_dir=str(tmp_path / "o"),
            tasks=["a"],
            precision="int8",
            calib_data=str(calib),
            calib_images=4,
            eval_images=2,
        ),
    )
    q = rep["tasks"]["a"]["int8"]
    cal = q["calibration"]
    assert cal["images"] == 4 and q["evaluation"]["images"] == 2
    assert cal["unreadable_images"] == 1 and "bad0.png" in cal["unreadable_examples"][0]
    assert cal["source"] == f"4 images of the folder {calib}"
    saved = json.loads((tmp_path / "o" / "export_report.json").read_text())
    assert saved["tasks"]["a"]["int8"]["calibration"]["unreadable_images"] == 1
    # no readable image at all: one line, and no output folder
    none = _calib_folder(tmp_path / "none", good=0, bad=2)
    args = ["--model", "m3vit_tiny_patch16_224", "--set", "depth=1", "--tasks-def", '{"semseg": 3}', "--task", "semseg"]
    assert _export_tool()([*args, "--precision", "int8", "--calib-data", str(none), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: calibration data {str(none)!r}: none of its 2 images can be read (first: ")
    assert "\n" not in err and not (tmp_path / "o2").exists()


def test_failed_export_removes_the_empty_folders_it_created(tmp_path, monkeypatch):
    import vision_moe.deploy.pipeline as pipeline

    def fail(*a, **k):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(pipeline, "export_onnx", fail)
    model = _small("vit_mtl_tiny_patch16_224")
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_model(model, ExportConfig(out_dir=str(tmp_path / "a" / "b")))
    assert not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()  # a folder that was there before is left alone
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_model(model, ExportConfig(out_dir=str(tmp_path / "mine")))
    assert (tmp_path / "mine").is_dir()


def test_cli_checkpoint_roundtrip(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("export_tool", ROOT / "tools" / "export.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    from vision_moe.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = build_multitask_model(
        "m3vit_tiny_patch16_224", {"classification": 6, "saliency": None}, img_size=32, head="linear", **SMALL, **MOE
    )
    ck = save_checkpoint(tmp_path / "ck", m, dict(model=_small_model_cfg({"classification": 6, "saliency": None})))
    out = tmp_path / "o"
    assert tool.main(["--checkpoint", str(ck), "--task", "saliency", "--format", "engine", "--out", str(out)]) == 0
    assert "saliency" in capsys.readouterr().out
    rep = json.loads((out / "export_report.json").read_text())
    assert rep["tasks"]["saliency"]["fp32"]["io"]["outputs"]["out"] == [1, 1, 32, 32]
    assert (out / "build_engine.sh").exists() or rep["tasks"]["saliency"]["engine"]["built"]
    # INT8 with the calibration / evaluation sizes from the command line
    out8 = tmp_path / "o8"
    args = ["--checkpoint", str(ck), "--task", "classification", "--precision", "int8", "--out", str(out8)]
    assert tool.main(args + ["--calib-images", "4", "--eval-images", "6"]) == 0
    q = json.loads((out8 / "export_report.json").read_text())["tasks"]["classification"]["int8"]
    assert q["calibration"]["images"] == 4 and q["evaluation"]["images"] == 6


@pytest.mark.parametrize(
    "name, capacity",
    [("vit_mtl_tiny_patch16_224", None), ("m3vit_tiny_patch16_224", None), ("m3vit_tiny_patch16_224", 1.0)],
)
def test_dynamo_exporter(tmp_path, name, capacity):
    rep = export_model(
        _small(name),
        ExportConfig(out_dir=str(tmp_path), tasks=["a"], exporter="dynamo", parity_images=1, capacity_factor=capacity),
    )
    _assert_clean(rep)
    # the opset the file declares is the one reported (and checked against TensorRT's tables)
    assert rep["tasks"]["a"]["fp32"]["opset"] == rep["config"]["opset"] == 18
    from vision_moe.deploy.onnx_export import file_opset

    assert file_opset(onnx.load(str(tmp_path / "a.onnx"))) == 18
    if capacity is not None:
        assert rep["tasks"]["a"]["routing"]["dispatcher"] == "GatherDispatcher"


@pytest.mark.parametrize("runtime", ["tensorrt", "onnxruntime"])
def test_int8_runtimes_quantise_every_weight_gemm_but_the_routers(tmp_path, runtime):
    """Both INT8 files: every weight GEMM (experts included) becomes an integer kernel in ONNX Runtime, routers and
    attention's activation x activation products stay float; TensorRT's has symmetric int8 activations, ONNX
    Runtime's uint8 ones."""
    import onnxruntime as ort

    torch.manual_seed(0)
    m = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=("a", "b"), num_classes=5, **SMALL, **MOE).eval()
    cfg = ExportConfig(
        out_dir=str(tmp_path), tasks=["a"], precision="int8", int8_runtime=runtime, calib_images=4, eval_images=4
    )
    rep = export_model(m, cfg)
    e = rep["tasks"]["a"]["int8"]
    path = tmp_path / e["path"]
    assert path.name == ("a.int8.onnx" if runtime == "tensorrt" else "a.int8.ort.onnx") and e["runtime"] == runtime
    q = onnx.load(str(path))
    inits = {i.name: i for i in q.graph.initializer}
    act_zps = [
        inits[n.input[2]]
        for n in q.graph.node
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[0] not in inits
    ]
    assert act_zps
    want = onnx.TensorProto.INT8 if runtime == "tensorrt" else onnx.TensorProto.UINT8
    assert {z.data_type for z in act_zps} == {want}
    if runtime == "tensorrt":
        assert all(not onnx.numpy_helper.to_array(z).any() for z in act_zps)  # zero points 0
        assert e["tensorrt"]["10.3"]["ok"]
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(str(tmp_path / "optimized.onnx"))
    opt_inits = {i.name for i in opt.graph.initializer}
    float_weight_gemms = [
        n.name
        for n in opt.graph.node
        if n.op_type in ("Gemm", "MatMul", "FusedMatMul") and any(x in opt_inits for x in n.input)
    ]
    assert float_weight_gemms and all("/router/" in n for n in float_weight_gemms), float_weight_gemms
    integer = [n for n in opt.graph.node if n.op_type in ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat")]
    assert len(integer) >= 2 * len(m.blocks) + 1  # qkv + proj per block, MLP / expert GEMMs, head
    assert "QLinearSoftmax" not in {n.op_type for n in opt.graph.node}
    with pytest.raises(ValueError, match="int8_runtime='tensorrt'"):
        ExportConfig(out_dir=str(tmp_path), precision="int8", fmt="engine", int8_runtime="onnxruntime").validate()


def test_multitask_graph_with_detection_matches_every_per_task_graph(tmp_path):
    """The quickstart's task mix in one graph: classification on ``logits``, semseg on ``out``, detection decoded on
    ``boxes`` / ``scores``; each task index gives its per-task graph's outputs (checked inside export_model)."""
    torch.manual_seed(0)
    m = build_multitask_model(
        "m3vit_tiny_patch16_224",
        {"classification": 3, "detection": 4, "semseg": 5},
        img_size=(64, 96),
        head_kwargs=dict(det_channels=32, det_num_convs=1, head_channels=8),
        **SMALL,
        **MOE,
    )
    rep = export_model(m, ExportConfig(out_dir=str(tmp_path), batch=1, multitask=True, parity_images=2))
    _assert_clean(rep)
    mt = rep["multitask"]
    assert mt["task_output"] == {"classification": "logits", "detection": ["boxes", "scores"], "semseg": "out"}
    assert mt["out_channels"] == {"classification": 3, "detection": 4, "semseg": 5}
    assert list(mt["io"]["outputs"]) == ["logits", "out", "boxes", "scores"]
    for t in ("classification", "detection", "semseg"):
        assert mt["vs_per_task_graph"][t]["rel"] <= 1e-4
        assert set(mt["parity"][t]["outputs"]) == {"logits", "out", "boxes", "scores"}
    # by hand for detection: task index 1 on the multi-task graph = detection.onnx
    from vision_moe.deploy import ort_session
    from vision_moe.deploy.prepost import sample_images

    x = sample_images(1, (64, 96), (0.5,) * 3, (0.5,) * 3)
    got = ort_session(tmp_path / "multitask.onnx").run(["boxes", "scores"], {"images": x, "task": np.array([1])})
    ref = ort_session(tmp_path / "detection.onnx").run(None, {"images": x})
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=0, atol=1e-4 * max(1.0, float(np.abs(r).max())))


def _builtin_experiment(root, tasks):
    from vision_moe.config import config_from_dict

    return config_from_dict(
        {
            "model": {"backbone": "m3vit_tiny_patch16_224", "img_size": 64},
            "tasks": {t: {} for t in tasks},
            "data": {
                "datasets": [{"format": "builtin", "root": str(root), "num_train": 8, "num_val": 6, "seed": 1}],
                "eval_batch_size": 4,
                "num_workers": 0,
            },
        }
    )


def test_int8_drop_is_the_task_metric_on_labelled_data_through_the_evaluator(tmp_path):
    """With labelled data (a training config) the INT8 drop is the task's own metric computed by the evaluator
    tools/eval.py uses, for both graphs: semseg mIoU against the masks, detection COCO AP50 against the annotations
    (host NMS as on the device); calibration images come from the training split."""
    from vision_moe.data.builtin import prepare_builtin
    from vision_moe.deploy.evaluate import OrtTaskModel
    from vision_moe.engine.evaluator import evaluate_task, heldout_loader, task_dataset

    root = prepare_builtin(tmp_path / "data", seed=1, num_train=8, num_val=6, img_size=64)
    exp = _builtin_experiment(tmp_path / "data", ["semseg", "detection"])
    torch.manual_seed(0)
    m = build_multitask_model(
        "m3vit_tiny_patch16_224",
        {"semseg": 6, "detection": 5},
        img_size=64,
        head_kwargs=dict(det_channels=32, det_num_convs=1, head_channels=8),
        **SMALL,
        **MOE,
    ).eval()
    m.heads["detection"].score_thresh = 0.0  # random weights: keep candidates so COCOeval has detections
    cfg = ExportConfig(out_dir=str(tmp_path / "out"), precision="int8", experiment=exp, calib_images=4, eval_images=5)
    rep = export_model(m, cfg)
    assert root.is_dir()
    for task, metric in (("semseg", "mIoU"), ("detection", "AP50")):
        e = rep["tasks"][task]["int8"]
        ev = e["evaluation"]
        assert ev["labelled"] and ev["metric"].startswith(f"{metric} (labels: 5 held-out images of the builtin")
        assert "training split" in e["calibration"]["source"] and e["calibration"]["images"] == 4
        assert ev["images"] == 5 and ev["drop"] == pytest.approx(ev["fp32"] - ev["quantized"])
        assert ev["measured_with"].startswith("estimate:")  # the TensorRT file: QDQ reference arithmetic
        # the fp32 figure is the evaluator's own on the exported graph: recompute it directly
        ds = task_dataset(exp, task, "val")
        graph = OrtTaskModel(vision_moe.deploy.ort_session(tmp_path / "out" / f"{task}.onnx"), task, rep["tasks"][task])
        direct = evaluate_task(graph, task, heldout_loader(exp, ds, limit=5), ds, 6 if task == "semseg" else 5, "cpu")
        assert ev["fp32_metrics"] == pytest.approx(direct)
        assert ev["fp32"] == pytest.approx(100 * direct[metric])
    assert rep["tasks"]["semseg"]["int8"]["evaluation"]["fp32"] < 100.0  # a metric, not agreement with fp32
    # the same metric as the PyTorch model's own through the evaluator (fp32 graph = model)
    ds = task_dataset(exp, "semseg", "val")
    torch_m = evaluate_task(m, "semseg", heldout_loader(exp, ds, limit=5), ds, 6, torch.device("cpu"))
    assert rep["tasks"]["semseg"]["int8"]["evaluation"]["fp32_metrics"]["mIoU"] == pytest.approx(torch_m["mIoU"])


def test_labelled_data_that_misses_a_task_is_refused_before_writing(tmp_path):
    from vision_moe.data.builtin import prepare_builtin

    prepare_builtin(tmp_path / "data", seed=1, num_train=8, num_val=6, img_size=64)
    exp = _builtin_experiment(tmp_path / "data", ["semseg"])
    m = build_multitask_model("m3vit_tiny_patch16_224", {"depth": None}, img_size=64, head="linear", **SMALL, **MOE)
    with pytest.raises(ValueError, match="no dataset in the config labels task 'depth'"):
        export_model(m, ExportConfig(out_dir=str(tmp_path / "out"), precision="int8", experiment=exp))
    assert not (tmp_path / "out").exists()


def test_checkpoint_source_uses_the_normalisation_it_was_trained_with(tmp_path):
    from vision_moe.deploy.source import load_checkpoint_source
    from vision_moe.engine.checkpoint import save_checkpoint

    m = build_multitask_model("m3vit_tiny_patch16_224", {"semseg": 3}, img_size=32, head="linear", **SMALL, **MOE)
    model_cfg = _small_model_cfg({"semseg": 3})
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ck = save_checkpoint(tmp_path / "a", m, dict(model=dict(model_cfg, mean=mean, std=std)))
    assert load_checkpoint_source(ck)[2:] == (tuple(mean), tuple(std))
    # written without them in "model": the experiment's data section
    ck = save_checkpoint(tmp_path / "b", m, dict(model=model_cfg, experiment=dict(data=dict(mean=mean, std=std))))
    assert load_checkpoint_source(ck)[2:] == (tuple(mean), tuple(std))
    ck = save_checkpoint(tmp_path / "c", m, dict(model=model_cfg))
    assert load_checkpoint_source(ck)[2:] == ((0.5,) * 3, (0.5,) * 3)


# ------------------------------------------------------------------ what a newcomer hits: output folders, flags, seeds
def test_a_failed_export_leaves_the_output_folder_as_it_was(tmp_path, monkeypatch):
    """The export is staged in a sibling folder and moved into place when done: a failure after some graphs were
    written leaves no file, no staging folder, and an existing --out untouched (even with overwrite)."""
    import vision_moe.deploy.pipeline as pipeline

    calls = {"n": 0}
    real = pipeline._parity

    def fail_on_second_task(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("parity failed")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "_parity", fail_on_second_task)
    model = _small("vit_mtl_tiny_patch16_224")
    with pytest.raises(RuntimeError, match="parity failed"):
        export_model(model, ExportConfig(out_dir=str(tmp_path / "new"), parity_images=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # a.onnx was written, then taken away with the stage
    old = tmp_path / "old"
    old.mkdir()
    (old / "a.onnx").write_text("the previous export")
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="parity failed"):
        export_model(model, ExportConfig(out_dir=str(old), parity_images=1, overwrite=True))
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / "a.onnx").read_text() == "the previous export"


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.int8.onnx").write_text("from an earlier export")
    model = _small("vit_mtl_tiny_patch16_224")
    with pytest.raises(ValueError, match="is not empty; choose a new folder, or overwrite"):
        export_model(model, ExportConfig(out_dir=str(out), tasks=["a"], parity_images=1))
    rep = export_model(model, ExportConfig(out_dir=str(out), tasks=["a"], parity_images=1, overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == ["a.onnx", "build_engine.sh", "export_report.json"]
    # the Jetson kit's next step works for every export: build_engine.sh holds the trtexec line of each graph
    assert "--onnx=a.onnx --saveEngine=a.fp32.engine" in (out / "build_engine.sh").read_text()
    assert rep["tasks"]["a"]["engine"] == dict(
        built=False, reason="format onnx: build on the device", precision="fp32", script="build_engine.sh"
    )


def test_capacity_on_a_model_without_experts_and_dynamo_opsets_are_refused(tmp_path):
    with pytest.raises(ValueError, match="capacity_factor 1: this model has no MoE layers"):
        export_model(_small("vit_mtl_tiny_patch16_224"), ExportConfig(out_dir=str(tmp_path / "o"), capacity_factor=1))
    cfg = ExportConfig(out_dir=str(tmp_path / "o"), exporter="dynamo")
    cfg.validate()
    assert cfg.opset == 18  # the dynamo exporter's lowest; torchscript's is 17
    with pytest.raises(ValueError, match="opset 17: the dynamo exporter writes opset 18 or newer"):
        ExportConfig(out_dir=str(tmp_path / "o"), exporter="dynamo", opset=17).validate()
    assert not (tmp_path / "o").exists()


def test_detection_with_a_dynamic_batch(tmp_path):
    """Decoded detection outputs keep every dimension but the batch static (A anchors, K classes)."""
    m = _small_detector()
    rep = export_model(m, ExportConfig(out_dir=str(tmp_path), batch=2, dynamic_batch=True, parity_images=2))
    e = rep["tasks"]["detection"]
    a = sum(e["level_counts"])
    assert e["fp32"]["io"]["outputs"] == {"boxes": ["batch", a, 4], "scores": ["batch", a, 3]}
    assert e["fp32"]["parity_batch_1"]["images"] == 2  # batch 1 through the same graph


def test_export_tool_is_seeded_prints_its_stages_and_the_next_step(tmp_path, capsys):
    """Random-init exports are seeded (the same command writes the same file); the console shows each stage, what
    INT8 was calibrated and measured on, and the next command."""
    args = ["--model", "m3vit_tiny_patch16_224", "--set", "depth=1", "--set", "embed_dim=32", "--set", "num_heads=2"]
    args += ["--tasks-def", '{"classification": 4}', "--img-size", "32", "32", "--all-tasks"]
    args += ["--precision", "int8", "--calib-images", "2", "--eval-images", "2"]
    assert _export_tool()([*args, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert _export_tool()([*args, "--out", str(tmp_path / "b")]) == 0
    rep = [json.loads((tmp_path / d / "export_report.json").read_text()) for d in "ab"]
    sha = [r["tasks"]["classification"]["fp32"]["sha256"] for r in rep]
    assert sha[0] == sha[1] and rep[0]["model"]["weights"] == "random init (seed 0)"
    assert _export_tool()([*args, "--seed", "1", "--out", str(tmp_path / "c")]) == 0
    rep_c = json.loads((tmp_path / "c" / "export_report.json").read_text())
    assert rep_c["tasks"]["classification"]["fp32"]["sha256"] != sha[0]
    for needle in (
        "classification: exported classification.onnx (",
        "classification: ONNX Runtime = PyTorch to ",
        "classification: INT8 classification.int8.onnx (",
        "calibrated on 2 images of scikit-image's bundled photographs",
        "top-1 agreement with FP32 (no labels: 2 images",
        "not an accuracy",
        "measured with estimate: ONNX Runtime",
        "next:",
        f"python3 export/build_engine.py {tmp_path / 'a'} --precision int8",
    ):
        assert needle in out, (needle, out)
