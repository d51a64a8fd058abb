"""HLS path: generated project compiles with g++ (-O0, -O2, ASan/UBSan), its testbench is bit-exact with the NumPy
fixed-point reference at every layer, task sparsity, performance model, bad input. Vitis tests skip without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import vision_moe
from vision_moe.deploy.hls import HLSConfig, UnsupportedModelError, compile_csim, export_hls, parse_fx, run_csim
from vision_moe.deploy.hls.config import FxType
from vision_moe.deploy.hls.fixed import Tables, exact_matmul, exp_fx, gelu_fx, quantize, recip_fx, rsqrt_fx
from vision_moe.deploy.hls.generator import _tile_major
from vision_moe.deploy.hls.perf import estimate

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_experts=4, top_k=2, expert_hidden=32)
# only the tests that compile the C++ need g++ (CI has it); the generator, the NumPy fixed-point reference, the
# accuracy and performance models and the error paths are tested without it
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def small_model(tasks=("a", "b"), num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return vision_moe.create_model(
        "m3vit_tiny_patch16_224", tasks=list(tasks), num_classes=num_classes, **dict(SMALL, **kw)
    ).eval()


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    """Task 'a' restricted to experts {0, 1, 3} in its MoE layer; the generated project (not compiled)."""
    m = small_model()
    m.restrict_experts("a", [torch.tensor([True, True, False, True])])
    out = tmp_path_factory.mktemp("hls_sparse")
    proj = export_hls(m, "a", out, HLSConfig(board="zcu102"), name="small")
    return m, proj


@pytest.fixture(scope="module")
def sparse_project(sparse_export):
    """The sparse project compiled three ways in parallel."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    m, proj = sparse_export
    builds = {"O0": dict(opt="-O0"), "O2": dict(opt="-O2"), "asan": dict(opt="-O0", sanitize=True)}
    with ThreadPoolExecutor(3) as ex:
        futs = {k: ex.submit(compile_csim, proj.out_dir, exe=f"tb_{k}", **v) for k, v in builds.items()}
        exes = {k: f.result() for k, f in futs.items()}
    return m, proj, exes


@pytest.mark.parametrize("build", ["O0", "O2", "asan"])
def test_csim_bit_exact_every_layer(sparse_project, build):
    _, proj, exes = sparse_project
    r = run_csim(exes[build], proj.out_dir, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    lines = [x for x in r.stdout.splitlines() if re.match(r"^a\s+layer\s+\d+ ", x)]
    assert len(lines) == len(proj.layer_names) and all("bit-exact" in x for x in lines)
    assert "PASS" in r.stdout.splitlines()[-1]


def test_testbench_catches_a_wrong_value(sparse_project, tmp_path):
    _, proj, exes = sparse_project
    d = tmp_path / "prj"
    shutil.copytree(proj.out_dir, d, ignore=shutil.ignore_patterns("tb_O*", "tb_asan"))
    g = d / "tb_data" / "a" / "layer003.bin"  # blocks.0.attn
    v = np.fromfile(g, dtype="<i4")
    v[5] += 1
    v.tofile(g)
    r = run_csim(exes["O2"], d, timeout=60)
    assert r.returncode == 1 and "MISMATCH" in r.stdout and "FAIL" in r.stdout


def test_task_sparsity_and_footprint(sparse_export):
    m, proj = sparse_export
    moe = [b for b in proj.spec.blocks if b.is_moe]
    assert [b.expert_ids for b in moe] == [[0, 1, 3]]
    blob = np.fromfile(proj.out_dir / "firmware" / "weights" / "weights.bin", dtype="<i2")
    cfg, t = proj.qmodel.cfg, proj.spec.tile
    experts = m.blocks[1].mlp.experts

    def tiles(e):
        w = quantize(experts.fc1.weight[e].detach().double().numpy(), cfg.weight)
        return _tile_major(w, t).astype(np.int16)

    def contains(hay, needle):
        win = np.lib.stride_tricks.sliding_window_view(hay, needle.size)
        return bool((win == needle).all(axis=1).any())

    assert contains(blob, tiles(3)) and not contains(blob, tiles(2))  # expert 2 is unreachable for task 'a'
    assert proj.footprint < proj.footprint_full
    s = proj.summary()
    assert "weight footprint" in s and "blocks.1: experts kept [0, 1, 3] of 4" in s
    params = (proj.out_dir / "firmware" / "parameters.h").read_text()
    assert "#define MAX_EXPERTS 3" in params and "#define NUM_TASKS 1" in params


def test_fixed_point_close_to_float(sparse_export):
    m, proj = sparse_export
    acc = proj.accuracy["a"]
    print(f"\nfixed vs float: MSE {acc['mse']:.3e} max {acc['max_abs']:.3e} top-1 agreement {acc['metric']:.2f}")
    # the float logits are ~0.1 (std 0.085) with top-1 margins down to ~4e-3; the fixed-point rounding error stays
    # ~1e-3 (measured: MSE 7e-7, max 1.7e-3). A shared bug in the model extraction that both the C++ and the NumPy
    # reference would carry (e.g. the gates' renormalisation flipped: MSE 7e-5, max 0.015) must not pass.
    assert acc["images"] == 3 and acc["mse"] < 5e-6 and acc["max_abs"] < 8e-3 and acc["metric"] == 1.0
    # specialised + restricted: the reference follows the restricted model, not the unrestricted one
    meta = json.loads((proj.out_dir / "project.json").read_text())
    assert meta["experts"] == {"blocks.1": [0, 1, 3]} and meta["layers"] == proj.layer_names


@needs_gxx
def test_multitask_build_selects_task(tmp_path):
    m = small_model(num_classes=0, depth=2)
    proj = export_hls(m, "all", tmp_path, HLSConfig(tile=16, attn_rows=3), num_eval_images=1)
    assert proj.spec.tasks == ("a", "b")
    ra, rb = proj.references["a"], proj.references["b"]
    assert not np.array_equal(ra.output(), rb.output())  # different gates -> different outputs
    exe = compile_csim(tmp_path, opt="-O1")
    r = run_csim(exe, tmp_path, timeout=60)
    assert r.returncode == 0, r.stdout[-2000:]
    assert r.stdout.count("bit-exact") == 2 * len(proj.layer_names)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(img_size=(36, 36)), "image size 36x36 is not a multiple of the patch size 8"),
        (
            dict(cfg=HLSConfig(tile=16), model=dict(embed_dim=48, num_heads=3)),
            "head count 3 does not divide the tile size 16",
        ),
        (
            dict(model=dict(moe_attn_blocks="every2", attn_num_experts=4, attn_top_k=2)),
            "unsupported layer: MoE attention",
        ),
        (dict(model=dict(capacity_factor=1.0)), "expert capacity"),
        (dict(model=dict(qk_norm=True)), "qk_norm"),
        (dict(model=dict(stem_channels=[8, 8])), "unsupported layer: HybridEmbed patch embedding"),
    ],
)
def test_unsupported_model_fails_at_generation(tmp_path, kw, match):
    m = small_model(**kw.get("model", {}))
    with pytest.raises(UnsupportedModelError, match=match) as e:
        export_hls(m, "a", tmp_path, kw.get("cfg"), img_size=kw.get("img_size"), num_eval_images=0)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "firmware").exists()


def test_overflow_is_reported_per_tensor(tmp_path):
    m = small_model()
    with torch.no_grad():
        m.patch_embed.proj.weight.mul_(300.0)  # weights beyond ap_fixed<16,2>, activations beyond the narrow type
    cfg = HLSConfig(act=parse_fx("ap_fixed<24,6>"))
    proj = export_hls(m, "a", tmp_path, cfg, num_eval_images=0)
    assert proj.qmodel.log.nonzero().get("patch_embed.weight", 0) > 0
    assert proj.references["a"].log.nonzero().get("patch_embed", 0) > 0
    s = proj.summary()
    assert "overflow" in s and "patch_embed.weight:" in s


def test_fixed_point_primitives():
    cfg = HLSConfig()
    tab = Tables.build(cfg)
    x = np.linspace(-16, 0, 2001)
    assert np.abs(exp_fx(quantize(x, cfg.act), cfg, tab) / 2**17 - np.exp(x)).max() < 2e-5
    x = np.linspace(0.05, 300, 2001)
    assert np.abs(recip_fx(quantize(x, cfg.act), cfg, tab) / 2**22 * x - 1).max() < 2e-4
    x = np.linspace(1e-4, 300, 2001)
    assert np.abs(rsqrt_fx(quantize(x, cfg.var_type), cfg, tab) / 2**20 * np.sqrt(x) - 1).max() < 1e-4
    x = np.linspace(-12, 12, 2001)
    g = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(gelu_fx(quantize(x, cfg.act), cfg, tab) / 2**22 - g).max() < 1e-4
    rng = np.random.default_rng(0)
    a, b = rng.integers(-(2**31), 2**31, (3, 70)), rng.integers(-(2**31), 2**31, (70, 5))
    ref = (a.astype(object) @ b.astype(object)) % 2**64
    ref = np.where(ref >= 2**63, ref - 2**64, ref).astype(np.int64)
    assert np.array_equal(exact_matmul(a, b), ref)  # wraps like the 64-bit accumulator
    with pytest.raises(ValueError, match="cannot parse fixed-point type"):
        parse_fx("float")
    assert parse_fx("ap_ufixed<8,0>") == FxType(8, 0, signed=False)


def test_performance_model(sparse_export):
    _, proj = sparse_export
    spec, cfg = proj.spec, proj.qmodel.cfg
    p1 = estimate(spec, cfg)
    p2 = estimate(spec, HLSConfig(attn_rows=2 * cfg.attn_rows))
    a1 = {x.name: x.cycles for x in p1.layers}
    a2 = {x.name: x.cycles for x in p2.layers}
    assert a2["blocks.0.attn"] < a1["blocks.0.attn"] and p2.dsp > p1.dsp
    assert p1.latency_ms == pytest.approx(p1.cycles / (cfg.clock * 1e3))
    moe = [x for x in proj.perf.layers if "moe" in x.name][0]
    assert moe.weight_bytes > 0 and p1.bram18k > 0
    s = proj.summary()
    assert "latency" in s and "Edge-MoE published" in s and "ZCU102" in s and "2.24x" in s


def test_cli(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import export_hls as cli
    finally:
        sys.path.pop(0)
    args = ["--model", "m3vit_tiny_patch16_224"] + [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    args += ["--set=num_classes=5", '--set=tasks=["x"]']
    assert cli.main(args + ["--task", "x", "--board", "zcu104", "--out", str(tmp_path), "--eval-images", "1"]) == 0
    out = capsys.readouterr().out
    assert "weight footprint" in out and "latency" in out and "zcu104" in out
    assert (tmp_path / "build_prj.tcl").is_file() and (tmp_path / "host" / "host.cpp").is_file()
    assert "xilinx_zcu104" in (tmp_path / "link.cfg").read_text()
    assert cli.main(args + ["--task", "x", "--tile", "12", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tile size 12" in err


@pytest.mark.slow
@needs_gxx
def test_m3vit_tiny_real_size(tmp_path):
    torch.manual_seed(0)
    m = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=["semseg", "depth"]).eval()
    proj = export_hls(m, "semseg", tmp_path, HLSConfig(), name="m3vit_tiny_patch16_224", num_eval_images=1)
    print("\n" + proj.summary())
    exe = compile_csim(tmp_path, opt="-O2")
    # the debug switch re-runs from the input, so checking all 87 layers costs ~43 forward passes: every 7th + final
    r = run_csim(exe, tmp_path, every=7, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:]
    checked = [i for i in range(len(proj.layer_names)) if i % 7 == 0 or i == len(proj.layer_names) - 1]
    assert r.stdout.count("bit-exact") == len(checked)


@pytest.mark.vitis
@pytest.mark.skipif(shutil.which("vitis_hls") is None, reason="needs Vitis HLS (vitis_hls on PATH)")
def test_vitis_csim(sparse_export):
    _, proj = sparse_export
    r = subprocess.run(
        ["vitis_hls", "-f", "build_prj.tcl", "csim=1 synth=0 reset=1"],
        cwd=proj.out_dir,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout[-3000:]
