"""Restoration models through the export pipeline: every graph (each degradation's specialised network, and the
"auto" graph of a classifier-routed model) of dynamic height and width equals PyTorch in ONNX Runtime at the
export size and, through the runtime's reflection padding, at odd and non-square sizes; no data-dependent ops;
FP16 / INT8 variants with their PSNR drop on held-out images through the shared evaluator; the Jetson kit's
padding and tiling are tools/restore.py's; bad input gets one line."""

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_demoe import SMALL as DEMOE_SMALL  # tests/ is on sys.path (pytest's prepend import mode)

import vision_moe
from vision_moe.deploy.onnx_export import FORBIDDEN_OPS, ort_session
from vision_moe.deploy.pipeline import ExportConfig, export_model, restoration_network
from vision_moe.deploy.prepost import pad_reflect
from vision_moe.engine.inference import restore, tile_starts, tile_weights
from vision_moe.models.mofme import pad_to_multiple

ROOT = Path(__file__).resolve().parents[1]
# one entry point per restoration family and kind (generic over the registry: every family's tiny sizes)
SMALL = {
    "demoe_tiny": dict(width=4, top_k=2),
    # "+": an option of the same entry point (the blur statistics with frequency rings: fixed 21 x 21 convolutions)
    "demoe_tiny+stats": dict(width=4, top_k=2, classifier_stats=2, classifier_spectrum=4),
    # the ViT variant's small layout of its tests, its classifier with the image's blur statistics too
    "demoe_vit_tiny": dict(DEMOE_SMALL["demoe_vit_tiny"], top_k=2, classifier_stats=2),
    "nafnet_tiny": dict(width=4),
    "mofme_tiny_patch8": dict(embed_dim=32, num_heads=2, attn_head_dim=16, head_channels=8, tail_channels=8),
    "mofme_dense_tiny_patch8": dict(embed_dim=32, num_heads=2, attn_head_dim=16, head_channels=8, tail_channels=8),
}


def _kit(name):
    spec = importlib.util.spec_from_file_location(f"kit_{name}", ROOT / "export" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _perturbed(name, tasks):
    torch.manual_seed(0)
    net = vision_moe.create_model(name.split("+")[0], tasks=tasks, **SMALL[name]).eval()
    with torch.no_grad():  # away from the identity init, moderately (fp16 keeps its range)
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net


def test_every_family_has_an_exported_entry():
    families = {n.split("_")[0] for n in vision_moe.list_models(family="restoration")}
    assert families == {n.split("_")[0] for n in SMALL}


@pytest.mark.parametrize("name", list(SMALL))
def test_every_graph_equals_pytorch_at_any_size(name, tmp_path):
    tasks = ["deblur", "defocus"] if name.endswith("tiny") else ["derain", "dehaze"]
    net = _perturbed(name, tasks)
    report = export_model(net, ExportConfig(out_dir=str(tmp_path / "x"), img_size=(16, 24), parity_images=1))
    routed = getattr(net, "classifier_routed", False)
    assert sorted(report["tasks"]) == sorted(tasks + (["auto"] if routed else []))
    m = report["input"]["multiple"]
    for task, entry in report["tasks"].items():
        assert entry["fp32"]["io"]["inputs"]["images"] == [1, 3, "height", "width"]
        assert entry["fp32"]["io"]["outputs"]["out"] == [1, 3, "height", "width"]
        assert len(entry["fp32"]["parity_any_size"]["sizes"]) == 2  # odd and non-square, through the padding
        graph = onnx.load(str(tmp_path / "x" / f"{task}.onnx"))
        assert not {n.op_type for n in graph.graph.node} & (FORBIDDEN_OPS | {"If", "Loop", "NonZero"})
        # independently of the report: another odd size, padded as the runtime pads, against the network itself
        x = torch.rand(1, 3, 2 * m + 3, 3 * m + 1) * 2 - 1
        padded, (h, w) = pad_reflect(x.numpy(), m)
        got = ort_session(tmp_path / "x" / f"{task}.onnx").run(None, {"images": padded})[0][..., :h, :w]
        with torch.no_grad():
            ref = net(x, "auto") if task == "auto" else net.specialize(task)(x)
        np.testing.assert_allclose(got, ref.numpy(), rtol=0, atol=1e-4 * float(np.abs(ref.numpy()).max()))


@pytest.mark.parametrize("name", ["demoe_tiny+stats", "demoe_vit_tiny"])
def test_int8_and_fp16_keep_the_degradation_classifier_in_float(name, tmp_path):
    """The classifier is the image's router: like the token routers it stays fp32 in the INT8 (both runtimes) and
    FP16 files, its blur statistics included (logs of small band-passed energies, which 8-bit activations or fp16's
    range would change): its weights and arithmetic stay float32, no QuantizeLinear sits inside it, and no tensor
    between two of its fp32 nodes passes through fp16 (the converter's Cast pairs, removed)."""
    from vision_moe.deploy.quantize import convert_fp16, quantize_int8

    net = _perturbed(name, ["deblur", "defocus"])
    export_model(net, ExportConfig(out_dir=str(tmp_path / "x"), img_size=(32, 32), parity_images=1, tasks=["auto"]))
    src = tmp_path / "x" / "auto.onnx"
    calib = np.random.default_rng(0).uniform(-1, 1, (4, 3, 32, 32)).astype(np.float32)
    files = {"fp16": convert_fp16(src, tmp_path / "auto.fp16.onnx")}
    for runtime in ("tensorrt", "onnxruntime"):
        quantize_int8(src, tmp_path / f"auto.{runtime}.onnx", calib, runtime=runtime)
        files[runtime] = tmp_path / f"auto.{runtime}.onnx"
    for kind, path in files.items():
        g = onnx.load(str(path)).graph
        made_by = {o: n for n in g.node for o in n.output}
        inits = {i.name: i for i in g.initializer}
        cls = [n for n in g.node if "/classifier/" in n.name and n.op_type in ("Conv", "Gemm", "MatMul")]
        assert len(cls) >= 4, kind  # the 1x1 projection, the mask, the MLP's two layers (+ the statistics' filters)
        for n in cls:  # its own weights and arithmetic in float (the features it reads may be shared with experts)
            w = inits.get(n.input[1])
            if w is None:  # a weight behind a DequantizeLinear or a Cast is not float32 in the file
                assert made_by[n.input[1]].op_type not in ("DequantizeLinear", "Cast"), (kind, n.name)
            else:
                assert w.data_type == onnx.TensorProto.FLOAT, (kind, n.name)
        inside = [n.op_type for n in g.node if "/classifier/" in n.name]
        assert "QuantizeLinear" not in inside and "DequantizeLinear" not in inside, kind
        to = {n.output[0]: a.i for n in g.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
        round_trips = [
            n.name for n in g.node if to.get(n.output[0]) == onnx.TensorProto.FLOAT and to.get(n.input[0]) == 10
        ]
        assert not round_trips, (kind, round_trips)  # no fp32 -> fp16 -> fp32 between two fp32 nodes
        if kind == "fp16":  # the statistics read the fp32 input image itself, not its fp16 copy
            grey = next(n for n in g.node if n.name.endswith("/classifier/stats/ReduceMean"))
            assert grey.input[0] == g.input[0].name


def test_runtime_padding_is_the_networks(tmp_path):
    """The runtime contract (deploy side and the Jetson kit, NumPy) pads exactly as the networks do in PyTorch."""
    kit = _kit("prepost")
    x = torch.rand(2, 3, 13, 22)
    ref, hw = pad_to_multiple(x, 8)
    for fn in (pad_reflect, kit.pad_reflect):
        got, hw2 = fn(x.numpy(), 8)
        assert hw2 == hw and np.array_equal(got, ref.numpy())
    with pytest.raises(ValueError, match="smaller than the model's multiple 8"):
        kit.pad_reflect(np.zeros((1, 3, 5, 40), np.float32), 8)


def test_kit_tiling_is_tools_restore_tiling():
    kit = _kit("prepost")
    for size, tile, overlap in [(100, 32, 8), (64, 64, 16), (77, 40, 12)]:
        assert kit.tile_starts(size, tile, overlap) == tile_starts(size, tile, overlap)
    ys, xs = tile_starts(70, 32, 12), tile_starts(50, 32, 12)
    w_torch = tile_weights(ys, xs, 32, 32, 12)
    k = 0
    for i in range(len(ys)):
        for j in range(len(xs)):
            wy = kit._ramp(32, i > 0, i < len(ys) - 1, 12)
            wx = kit._ramp(32, j > 0, j < len(xs) - 1, 12)
            np.testing.assert_allclose(wy[:, None] * wx[None, :], w_torch[k].numpy())
            k += 1
    # the same tiled restoration of one image, by any network (here a fixed convolution and its pad contract)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).eval()

    def net(images, task=None):
        x, (h, w) = pad_to_multiple(images, 4)
        return conv(x)[..., :h, :w]

    img = torch.rand(1, 3, 45, 70)
    ref = restore(net, img, None, tile=32, overlap=12)
    with torch.no_grad():
        got = kit.restore_image(lambda a: conv(torch.from_numpy(a)).numpy(), img.numpy(), 4, tile=32, overlap=12)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


def test_bad_export_input_one_line(tmp_path):
    net = vision_moe.create_model("demoe_tiny", width=4)
    cases = [
        (dict(tasks=["derain"]), "unknown task 'derain'; this restoration model exports"),
        (dict(img_size=(20, 24)), r"image size \(20, 24\): a restoration graph is exported at a multiple of its 8"),
        (dict(exporter="dynamo"), "restoration graphs .* use torchscript"),
        (dict(multitask=True), "no multi-task graph"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            export_model(net, ExportConfig(out_dir=str(tmp_path / "x"), **kw))
        assert not (tmp_path / "x").exists()
    assert restoration_network(vision_moe.create_model("m3vit_tiny_patch16_224", depth=2)) is None
