"""INT8 files that behave the same on every x86 CPU: the ONNX Runtime file cannot saturate the 16-bit pair sums
of CPUs without VNNI (checked from its weights, not from this machine), its integer kernels agree with the QDQ
reference arithmetic here whatever this CPU is, the TensorRT file is estimated with that reference, and a file that
can saturate says so when it is loaded on a CPU that would."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import vision_moe
from vision_moe.deploy import ExportConfig, export_model, ort_session
from vision_moe.deploy.prepost import sample_images
from vision_moe.deploy.quantize import qdq_reference_session, saturation_check

SMALL = dict(depth=2, embed_dim=64, num_heads=4)
MOE = dict(num_experts=4, top_k=2, expert_hidden=64)


@pytest.fixture(scope="module")
def int8_files(tmp_path_factory):
    """One small M³ViT task graph quantised for both runtimes (calibrated on photographs)."""
    tmp = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    m = vision_moe.create_model(
        "m3vit_tiny_patch16_224", tasks=("a",), num_classes=5, img_size=(32, 48), **SMALL, **MOE
    ).eval()
    reports = {}
    for rt in ("tensorrt", "onnxruntime"):
        cfg = ExportConfig(out_dir=str(tmp / rt), precision="int8", int8_runtime=rt, calib_images=8, eval_images=8)
        reports[rt] = export_model(m, cfg)
    return tmp, reports


def _qdq_matmul(weights: np.ndarray) -> onnx.ModelProto:
    """x (1, K) uint8-quantised @ DequantizeLinear(int8 weights (K, N)): the pattern the integer kernels run."""
    k, n = weights.shape
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ]
    inits = [
        numpy_helper.from_array(weights.astype(np.int8), "w"),
        numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
        numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
        numpy_helper.from_array(np.array(0, np.uint8), "xz"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(
    "column, safe",
    [
        ([64, 64, -64, -64], True),  # 255 * 128 = 32640 <= 32767
        ([127, 2, 0, 0], False),  # 255 * 129 = 32895: two products can leave int16
        ([-128, -1, 5, 5], False),  # -255 * 129 < -32768
        ([127, -127, -1, 0], True),  # opposite signs never add up
    ],
)
def test_saturation_check_is_the_int16_bound_of_the_worst_weight_pair(column, safe):
    w = np.stack([np.array(column), np.array([1, 1, 1, 1])], axis=1)  # (K=4, N=2); the 2nd channel is harmless
    check = saturation_check(_qdq_matmul(w))
    assert check["saturation_free"] is safe
    assert check["max_weight_level"] == max(abs(v) for v in column)
    if not safe:
        assert check["layers_at_risk"] == [dict(node="mm", weight="w", channels=2, channels_at_risk=1)]


def test_onnxruntime_file_has_7_bit_weights_and_cannot_saturate(int8_files):
    tmp, reports = int8_files
    ort_e = reports["onnxruntime"]["tasks"]["a"]["int8"]
    trt_e = reports["tensorrt"]["tasks"]["a"]["int8"]
    assert ort_e["saturation"]["saturation_free"] and ort_e["saturation"]["max_weight_level"] <= 64
    # the check recomputed from the file itself, and carried in its metadata for whoever loads it
    q = onnx.load(str(tmp / "onnxruntime" / ort_e["path"]))
    assert saturation_check(q)["saturation_free"]
    assert {p.key: p.value for p in q.metadata_props}["vision_moe.u8s8_saturation_free"] == "true"
    # the TensorRT file keeps 8-bit weights (TensorRT accumulates in 32 bits), which can saturate on such CPUs
    assert trt_e["saturation"]["max_weight_level"] == 127 and not trt_e["saturation"]["saturation_free"]


def test_onnxruntime_integer_kernels_agree_with_the_qdq_reference_on_this_cpu(int8_files):
    """Whatever this CPU's integer kernels are (VNNI, or AVX2 / AVX-512 vpmaddubsw), the saturation-free file's
    outputs equal the QDQ arithmetic up to requantisation rounding."""
    tmp, reports = int8_files
    path = tmp / "onnxruntime" / reports["onnxruntime"]["tasks"]["a"]["int8"]["path"]
    x = sample_images(8, (32, 48), (0.5,) * 3, (0.5,) * 3)
    fast, ref = ort_session(path), qdq_reference_session(path)
    got = np.concatenate([fast.run(None, {"images": x[i : i + 1]})[0] for i in range(len(x))])
    want = np.concatenate([ref.run(None, {"images": x[i : i + 1]})[0] for i in range(len(x))])
    assert np.mean(np.abs(got - want)) <= 0.02 * np.mean(np.abs(want))
    assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 7 / 8


def test_the_tensorrt_file_is_estimated_with_the_reference_and_the_report_names_the_machine(int8_files):
    _, reports = int8_files
    for rt, prefix in (("tensorrt", "estimate: ONNX Runtime"), ("onnxruntime", "ONNX Runtime")):
        rep = reports[rt]
        assert rep["tasks"]["a"]["int8"]["evaluation"]["measured_with"].startswith(prefix)
        mach = rep["machine"]
        assert mach["cpu"] and isinstance(mach["cpu_flags"], list) and mach["torch_cpu_capability"]
        assert "ort_int8_kernels" in mach


@pytest.mark.parametrize("saturates", [True, False])
def test_loading_a_file_that_can_saturate_warns_on_a_saturating_cpu(int8_files, monkeypatch, caplog, saturates):
    import vision_moe.machine as machine

    tmp, reports = int8_files
    monkeypatch.setattr(machine, "int8_kernels", lambda: dict(path="test kernels", saturates=saturates))
    with caplog.at_level(logging.WARNING, logger="vision_moe.deploy.quantize"):
        ort_session(tmp / "tensorrt" / reports["tensorrt"]["tasks"]["a"]["int8"]["path"])
        ort_session(tmp / "onnxruntime" / reports["onnxruntime"]["tasks"]["a"]["int8"]["path"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if saturates:
        assert len(warnings) == 1 and warnings[0].startswith("a.int8.onnx: its 8-bit weights can saturate")
        assert "test kernels" in warnings[0] and "--int8-runtime onnxruntime" in warnings[0]
    else:
        assert warnings == []


def test_int8_kernel_path_from_cpu_flags(monkeypatch):
    import vision_moe.machine as machine

    cases = {
        frozenset({"avx2", "fma"}): True,
        frozenset({"avx2", "avx512f", "avx512bw"}): True,
        frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"}): False,
        frozenset({"avx2", "avx_vnni"}): False,
    }
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    for flags, saturates in cases.items():
        monkeypatch.setattr(machine, "_cpuinfo", lambda f=flags: ("test cpu", f))
        k = machine.int8_kernels()
        assert k["saturates"] is saturates, (flags, k)
        assert ("vpmaddubsw" in k["path"]) is saturates
    monkeypatch.setattr(machine.platform, "machine", lambda: "aarch64")
    assert machine.int8_kernels()["saturates"] is None


def test_cpu_id_and_the_cpus_that_split_256_bit_avx2(monkeypatch):
    import vision_moe.machine as machine

    assert machine.simd_datapath(("AuthenticAMD", 23, 1, 2))  # Zen (EPYC 7001): two 128-bit halves
    assert machine.simd_datapath(("AuthenticAMD", 23, 8, 2))  # Zen+
    assert machine.simd_datapath(("AuthenticAMD", 21, 2, 0))  # Bulldozer family
    assert machine.simd_datapath(("AuthenticAMD", 23, 0x31, 0)) is None  # Zen 2 (EPYC 7002)
    assert machine.simd_datapath(("AuthenticAMD", 25, 1, 1)) is None  # Zen 3 (EPYC 7003)
    assert machine.simd_datapath(("GenuineIntel", 6, 85, 7)) is None  # Skylake-SP
    monkeypatch.setattr(machine, "_cpu_signature", lambda: ("AuthenticAMD", 23, 1, 2))
    assert machine.cpu_id() == "AuthenticAMD family 23 model 1 stepping 2"
    info = machine.machine_info()
    assert info["cpu_id"] == machine.cpu_id() and "two halves" in info["simd_datapath"]
    monkeypatch.setattr(machine, "_cpu_signature", lambda: None)
    assert machine.cpu_id() == "" and "simd_datapath" not in machine.machine_info()
