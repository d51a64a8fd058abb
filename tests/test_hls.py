"""HLS path: generated projects compile with g++ (-O0, -O2, ASan/UBSan), their testbench is bit-exact with the NumPy
fixed-point reference at every layer (M³ViT with a patch embedding; Mod-Squad with a convolutional stem, MoE
attention, task embeddings and 8-bit experts), the performance model predicts the C-simulation's loop counts,
Edge-MoE side by side, task sparsity, bad input, the command line. Vitis tests skip without it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

import vision_moe
from vision_moe.deploy.hls import (
    HLSConfig,
    UnsupportedModelError,
    compile_csim,
    export_hls,
    parse_fx,
    read_counts,
    run_csim,
)
from vision_moe.deploy.hls.config import PRESETS, FxType
from vision_moe.deploy.hls.fixed import (
    Tables,
    exact_matmul,
    exp_fx,
    gelu_fx,
    quantize,
    quantize_per_channel,
    recip_fx,
    rsqrt_fx,
    scaled_shift,
)
from vision_moe.deploy.hls.generator import _tile_major
from vision_moe.deploy.hls.ir import extract
from vision_moe.deploy.hls.perf import COUNT_KINDS, compare_table, estimate, estimate_edge_moe

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_experts=4, top_k=2, expert_hidden=32)
# Mod-Squad with a convolutional stem: MoE attention (2 experts x 2 heads per token) and MoE MLP in block 1, task
# embeddings before every block, 8-bit weights in every linear layer but the gates and the stem (the experts from an
# on-chip buffer, the dense layers tile by tile), a multi-task build
MIXED = dict(
    SMALL,
    num_heads=4,
    attn_num_experts=4,
    attn_top_k=2,
    expert_heads=2,
    stem_channels=[8, 8],
    stem_strides=[2, 2, 2],
)
# only the tests that compile the C++ need g++ (CI has it); the generator, the NumPy fixed-point reference, the
# accuracy and performance models and the error paths are tested without it
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def small_model(tasks=("a", "b"), num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return vision_moe.create_model(
        "m3vit_tiny_patch16_224", tasks=list(tasks), num_classes=num_classes, **dict(SMALL, **kw)
    ).eval()


def mixed_model(seed=0, **kw):
    """The Mod-Squad / conv-stem model with BatchNorm statistics and task embeddings away from their init."""
    torch.manual_seed(seed)
    m = vision_moe.create_model("modsquad_small_patch16_224", tasks=["a", "b"], num_classes=0, **dict(MIXED, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 0.4 - 0.2)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) * 1.5 + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        m.task_embed.normal_(0, 0.05, generator=g)
    return m.eval()


def cli():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import export_hls as tool
    finally:
        sys.path.pop(0)
    return tool


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    """Task 'a' restricted to experts {0, 1, 3} in its MoE layer; the generated project (not compiled)."""
    m = small_model()
    m.restrict_experts("a", [torch.tensor([True, True, False, True])])
    out = tmp_path_factory.mktemp("hls_sparse")
    proj = export_hls(m, "a", out, HLSConfig(board="zcu102"), name="small")
    return m, proj


@pytest.fixture(scope="module")
def mixed_export(tmp_path_factory):
    """Both tasks of the Mod-Squad / conv-stem model with 8-bit weights (not compiled)."""
    m = mixed_model()
    out = tmp_path_factory.mktemp("hls_mixed")
    proj = export_hls(m, "all", out, HLSConfig(tile=16, attn_rows=3, weight8="all"), name="mixed")
    return m, proj


# the builds each project is checked with (ASan + UBSan build at -O0, so the patch-embedding project's -O0
# semantics are covered by its sanitizer build)
BUILDS = {"sparse": ("O2", "asan"), "mixed": ("O0", "O2", "asan")}


def _compile(proj, builds):
    flags = {"O0": dict(opt="-O0"), "O2": dict(opt="-O2"), "asan": dict(opt="-O0", sanitize=True)}
    with ThreadPoolExecutor(len(builds)) as ex:
        futs = {k: ex.submit(compile_csim, proj.out_dir, exe=f"tb_{k}", **flags[k]) for k in builds}
        return {k: f.result() for k, f in futs.items()}


@pytest.fixture(scope="module")
def compiled(sparse_export, mixed_export):
    """Both projects compiled (in parallel)."""
    if shutil.which("g++") is None:
        pytest.skip("needs g++")
    projects = {"sparse": sparse_export[1], "mixed": mixed_export[1]}
    with ThreadPoolExecutor(2) as ex:
        futs = {k: ex.submit(_compile, p, BUILDS[k]) for k, p in projects.items()}
        return {k: (projects[k], f.result()) for k, f in futs.items()}


@pytest.mark.parametrize("project, build", [(p, b) for p, bs in BUILDS.items() for b in bs])
def test_csim_bit_exact_every_layer(compiled, project, build):
    """Every layer of every task through the checkpoint hook; the debug switch on every 4th layer (-O2) or the
    last one (the slower -O0 and sanitizer builds)."""
    proj, exes = compiled[project]
    every = 4 if build == "O2" else 0
    r = run_csim(exes[build], proj.out_dir, every=every, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    n = len(proj.layer_names)
    for task in proj.spec.tasks:
        lines = [x for x in r.stdout.splitlines() if re.match(rf"^{task}\s+layer\s+\d+ ", x)]
        hook = [x for x in lines if "stop_after" not in x]
        assert len(hook) == n and all("bit-exact" in x for x in hook)
        stops = [x for x in lines if "stop_after" in x]
        assert len(stops) == len({i for i in range(n) if every and i % every == 0} | {n - 1})  # the debug switch
        assert all("bit-exact" in x for x in stops)
    assert "PASS" in r.stdout.splitlines()[-1]


def test_testbench_catches_a_wrong_value(compiled, tmp_path):
    proj, exes = compiled["sparse"]
    d = tmp_path / "prj"
    shutil.copytree(proj.out_dir, d, ignore=shutil.ignore_patterns("tb_O*", "tb_asan"))
    g = d / "tb_data" / "a" / "layer003.bin"  # blocks.0.attn
    v = np.fromfile(g, dtype="<i4")
    v[5] += 1
    v.tofile(g)
    r = run_csim(exes["O2"], d, timeout=60)
    assert r.returncode == 1 and "MISMATCH" in r.stdout and "FAIL" in r.stdout


@pytest.mark.parametrize("project", ["sparse", "mixed"])
def test_performance_model_predicts_the_csim_loop_counts(compiled, project, tmp_path):
    """The model's per-layer iteration counts of every pipelined loop kind equal what the C-simulation executes,
    and the parallelism it assumes is what parameters.h compiles the kernels with."""
    proj, exes = compiled[project]
    r = run_csim(exes["O2"], proj.out_dir, timeout=120, counts=tmp_path / "counts.txt")
    assert r.returncode == 0
    counts = read_counts(tmp_path / "counts.txt")
    assert set(next(iter(counts.values()))) == set(COUNT_KINDS)
    for ti, task in enumerate(proj.spec.tasks):
        model = estimate(proj.spec, proj.qmodel.cfg, proj.references[task].queues)
        assert [x.name for x in model.layers] == proj.layer_names
        for li, layer in enumerate(model.layers):
            assert layer.counts == counts[(ti, li)], (task, layer.name)
    params = (proj.out_dir / "firmware" / "parameters.h").read_text()
    defs = dict(re.findall(r"#define (\w+) (\d+)\n", params))
    cfg = proj.qmodel.cfg
    assert int(defs["TILE"]) == proj.spec.tile and int(defs["PAR_IN"]) == cfg.par_in
    assert int(defs["ATTN_ROWS"]) == cfg.attn_rows and int(defs["ATTN_LANES"]) == cfg.attn_lanes
    assert int(defs["OUT_PAR"]) == cfg.out_par and int(defs["VEC_PAR"]) == cfg.vec_par
    assert int(defs["LOAD16_PAR"]) == cfg.axi // 16 and int(defs["LOAD8_PAR"]) == cfg.axi // 8


def test_task_sparsity_and_footprint(sparse_export):
    m, proj = sparse_export
    moe = [b.mlp_moe for b in proj.spec.blocks if b.is_moe]
    assert [x.expert_ids for x in moe] == [[0, 1, 3]]
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
    assert "weight footprint" in s and "blocks.1.mlp: experts kept [0, 1, 3] of 4" in s
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
    assert meta["experts"] == {"blocks.1.mlp": [0, 1, 3]} and meta["layers"] == proj.layer_names


def test_stem_modsquad_and_8bit_follow_float(mixed_export):
    """The conv stem (BatchNorm folded, rescaled), Mod-Squad's MoE attention and task embeddings, 8-bit weights:
    the fixed-point tokens follow PyTorch's float ones (measured: MSE 9.4e-6 / 1.2e-5 for the two tasks, cosine
    1.000); measured with the extraction broken: each slot's query heads on the wrong key/value heads 6.5e-4,
    a BatchNorm folded without its running mean 1.3e-2, the two tasks' embeddings swapped 1.5."""
    m, proj = mixed_export
    sp = proj.spec
    assert len(sp.stem) == 3 and [c.stride for c in sp.stem] == [2, 2, 2] and sp.has_task_embed
    assert [b.attn_is_moe for b in sp.blocks] == [False, True] and sp.blocks[1].expert_heads == 2
    for t in ("a", "b"):
        acc = proj.accuracy[t]
        assert acc["output"] == "backbone tokens" and acc["mse"] < 3e-5 and acc["metric"] > 0.9999, acc
    ra, rb = proj.references["a"], proj.references["b"]
    assert not np.array_equal(ra.output(), rb.output())  # different gates and task embeddings
    assert "blocks.1.attn.q" in proj.layer_names and "patch_embed.backbone.1" in proj.layer_names
    qb = proj.qmodel.blocks
    assert qb[1]["attn_moe"].experts[0][0].is8 and qb[1]["kv"].is8 and qb[0]["qkv"].is8  # 8-bit everywhere but
    assert not qb[1]["attn_moe"].gates[0][0].is8 and not any(c.is8 for c in proj.qmodel.stem)  # gates, stem


def test_8bit_experts_halve_the_expert_bytes(sparse_export):
    """Per-output-channel symmetric int8: q in [-127, 127], scale max|w| / 127 rounded to the scale type; the
    experts' weight traffic per frame is halved (plus 4-byte scales); the reference still follows float."""
    m, proj = sparse_export
    w = np.random.default_rng(0).normal(0, 0.05, (64, 12))
    q, s = quantize_per_channel(w, 8, FxType(24, 0, signed=False))
    sv = s / 2.0**24
    assert np.abs(q).max() == 127 and np.allclose(sv, np.abs(w).max(0) / 127, rtol=1e-4)
    assert np.abs(q * sv - w).max() <= sv.max() / 2 + 1e-12
    cfg8 = HLSConfig(weight8="experts")
    p16 = estimate(proj.spec, proj.qmodel.cfg, proj.references["a"].queues)
    p8 = estimate(proj.spec, cfg8, proj.references["a"].queues)
    moe16, moe8 = p16.layers[proj.layer_names.index("blocks.1.moe")], p8.layers[proj.layer_names.index("blocks.1.moe")]
    wb = sum(f1.w.size + f2.w.size for f1, f2 in proj.qmodel.blocks[1]["mlp_moe"].experts)  # weights per frame
    assert moe16.weight_bytes - moe8.weight_bytes >= wb - 4 * 3 * (32 + 32)  # 1 byte less per weight, minus scales
    assert moe8.counts["load"] < 0.6 * moe16.counts["load"]
    from vision_moe.deploy.hls.generator import _accuracy
    from vision_moe.deploy.hls.reference import quantize_model

    acc = _accuracy(m.specialize("a"), quantize_model(proj.spec, cfg8), ("a",), [("x", _img(32))])["a"]
    assert acc["mse"] < 2e-5 and acc["metric"] == 1.0


def _img(size):
    from vision_moe.deploy.hls import builtin_images

    return builtin_images((size, size), 1)[0][1]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(img_size=(36, 36)), "image size 36x36 is not a multiple of the patch size 8"),
        (
            dict(cfg=HLSConfig(tile=16), model=dict(embed_dim=48, num_heads=3)),
            "head count 3 does not divide the tile size 16",
        ),
        (dict(model=dict(capacity_factor=1.0)), "expert capacity"),
        (dict(model=dict(qk_norm=True)), "qk_norm"),
        # a stem whose convolutions the kernel does not run names the layer and the config key
        (
            dict(model=dict(stem_channels=[8], stem_strides=[4, 2])),
            r"^patch_embed.backbone.0.conv: stride 4; .*stem_strides must hold only 1s and 2s",
        ),
        # Mod-Squad heads split so that top_k x expert_heads != num_heads
        (
            dict(mixed=dict(expert_heads=1)),
            r"^blocks.1.attn: MoE attention with top_k 2 x expert_heads 1 = 2 query heads per token; .*num_heads=4",
        ),
        # an 8-bit scale beyond the scale type
        (
            dict(cfg=HLSConfig(weight8="experts", scale=FxType(16, -4, signed=False)), scale_weights=True),
            r"^blocks.1.mlp.experts\[\d\].fc\d.weight: 8-bit weight scale .* overflows the scale type",
        ),
    ],
)
def test_unsupported_model_fails_at_generation(tmp_path, kw, match):
    m = mixed_model(**kw["mixed"]) if "mixed" in kw else small_model(**kw.get("model", {}))
    if kw.get("scale_weights"):
        with torch.no_grad():
            m.blocks[1].mlp.experts.fc1.weight.mul_(1000.0)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        export_hls(m, "a", tmp_path, kw.get("cfg"), img_size=kw.get("img_size"), num_eval_images=0)
    assert "\n" not in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing half-written


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
    small = rng.integers(-(2**20), 2**20, (3, 70))  # the single-product fast path
    assert np.array_equal(
        exact_matmul(small, b >> 20), (small.astype(object) @ (b >> 20).astype(object)).astype(np.int64)
    )
    acc, s = rng.integers(-(2**62), 2**62, 500), rng.integers(0, 2**24, 500)
    exact = (acc.astype(object) * s.astype(object)) >> 24
    low = np.array([int(v) % 2**64 for v in exact], dtype=object)
    got = scaled_shift(acc, s, 24).astype(object) % 2**64
    assert (got == low).all()  # the low 64 bits of the exact product, as ap_int<96> keeps them
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
    assert a2["blocks.0.attn"] < a1["blocks.0.attn"] and p2.dsp_total > p1.dsp_total
    p3 = estimate(spec, HLSConfig(par_in=2 * cfg.par_in, out_par=2 * cfg.out_par))
    assert {x.name: x.cycles for x in p3.layers}["blocks.0.qkv"] < a1["blocks.0.qkv"] and p3.dsp_total > p1.dsp_total
    assert p1.latency_ms == pytest.approx(p1.cycles / (cfg.clock * 1e3))
    moe = [x for x in proj.perf.layers if x.name.endswith(".moe")][0]
    assert moe.weight_bytes > 0 and p1.bram18k > 0
    s = proj.summary()
    assert "latency" in s and "Edge-MoE published" in s and "ZCU102" in s and "no synthesis" in s


def test_edge_moe_side_by_side_target():
    """On Edge-MoE's configuration, at a DSP estimate no higher than Edge-MoE's, this generator's design needs
    >= 1.3x fewer cycles per frame (balanced routing here; the preset's export uses the reference's routing)."""
    pr = PRESETS["edge-moe"]
    torch.manual_seed(0)
    m = vision_moe.create_model(pr.model, **pr.model_kwargs).eval()
    cfg = HLSConfig(**pr.hls)
    spec = extract(m.specialize("semseg"), ("semseg",), cfg)
    assert (spec.num_tokens, spec.dim, len(spec.blocks), spec.heads) == (129, 192, 12, 3)
    assert [b.index for b in spec.blocks if b.is_moe] == [1, 3, 5, 7, 9, 11] and spec.hidden == 768
    assert {(x.num_experts, x.top_k, x.hidden) for x in spec.moe_layers} == {(16, 2, 384)}
    ours, edge = estimate(spec, cfg), estimate_edge_moe(spec)
    ours8 = estimate(spec, HLSConfig(**dict(pr.hls, weight8="experts")))
    print("\n" + compare_table(ours, edge, ours8, "8-bit experts"))
    assert edge.cycles / ours.cycles >= 1.3 and ours.dsp_total <= edge.dsp_total
    assert ours8.cycles < ours.cycles and ours8.weight_bytes < 0.7 * ours.weight_bytes
    # the figure moves with the kernels' parameters: half the attention lanes cost cycles
    slower = estimate(spec, HLSConfig(**dict(pr.hls, attn_lanes=4)))
    assert slower.cycles > ours.cycles


@needs_gxx
def test_cli_edge_moe_preset_reduced_depth(tmp_path, capsys):
    """The preset at two layers (the real 192-d, 129-token, 16-expert shapes), C-simulation bit-exact."""
    out = tmp_path / "edge"
    args = ["--preset", "edge-moe", "--set", "depth=2", "--out", str(out), "--eval-images", "0", "--csim"]
    assert cli().main(args) == 0
    text = capsys.readouterr().out
    assert "Edge-MoE (modelled)" in text and "speed-up vs Edge-MoE" in text and "PASS" in text.splitlines()[-1]
    meta = json.loads((out / "project.json").read_text())
    assert meta["tasks"] == ["semseg"] and meta["parallelism"]["axi_bits"] == 256 and meta["clock_mhz"] == 300


def test_cli(tmp_path, capsys):
    tool = cli()
    args = ["--model", "m3vit_tiny_patch16_224"] + [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    args += ["--set=num_classes=5", '--set=tasks=["x"]']
    assert (
        tool.main(args + ["--task", "x", "--board", "zcu104", "--out", str(tmp_path / "a"), "--eval-images", "1"]) == 0
    )
    out = capsys.readouterr().out
    assert "weight footprint" in out and "latency" in out and "zcu104" in out
    assert (tmp_path / "a" / "build_prj.tcl").is_file() and (tmp_path / "a" / "host" / "host.cpp").is_file()
    assert "xilinx_zcu104" in (tmp_path / "a" / "link.cfg").read_text()
    assert tool.main(args + ["--task", "x", "--tile", "12", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tile size 12" in err


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


SMALL_ARGS = ["--model", "m3vit_tiny_patch16_224", "--task", "x", "--eval-images", "0"] + [
    f"--set={k}={json.dumps(v)}" for k, v in dict(SMALL, num_classes=0, tasks=["x"]).items()
]


@pytest.mark.parametrize(
    "extra, needles",
    [
        (["--img-size", "0", "0"], ["--img-size", "positive"]),  # issue 16 item 9
        (["--clock-mhz", "0"], ["--clock-mhz", "(0, 2000)"]),  # item 14
        (["--par-in", "0"], ["--par-in", "positive"]),
        (["--eval-images", "-1"], ["--eval-images", ">= 0"]),
        (["--eval-weight8"], ["--eval-weight8", "--checkpoint"]),
        (["--weight-type", "ap_fixed<20,2>"], ["at most 16 bits"]),
        (["--top", "1x"], ["not a C identifier"]),
    ],
)
def test_cli_bad_flags_one_line(tmp_path, capsys, extra, needles):
    assert cli().main(SMALL_ARGS + ["--out", str(tmp_path / "o")] + extra) == 2
    _one_line(capsys, *needles)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, needles",
    [(["--seed", "3"], ["--seed", "checkpoint"]), (["--set", "depth=2"], ["--set", "checkpoint"])],
)
def test_cli_checkpoint_refuses_flags_it_would_ignore(tmp_path, capsys, extra, needles):
    """Issue 16 item 14: a flag a checkpoint export would silently ignore is refused, before anything is read."""
    args = ["--checkpoint", str(tmp_path / "none"), "--task", "a", "--out", str(tmp_path / "o")]
    assert cli().main(args + extra) == 2
    _one_line(capsys, *needles)


def test_cli_out_folder_rules_and_seeding(tmp_path, capsys):
    """--out that is a file, or a non-empty folder without --overwrite: one line (issue 16 items 9 and 15);
    --overwrite replaces what an export wrote and keeps the rest; the same command writes the same files (item 16)."""
    tool = cli()
    f = tmp_path / "file"
    f.write_text("x")
    assert tool.main(SMALL_ARGS + ["--out", str(f)]) == 2
    _one_line(capsys, str(f), "is a file")
    a, b = tmp_path / "a", tmp_path / "b"
    assert tool.main(SMALL_ARGS + ["--out", str(a)]) == 0 and tool.main(SMALL_ARGS + ["--out", str(b)]) == 0
    capsys.readouterr()
    for rel in ("firmware/weights/weights.bin", "firmware/weights/biases.bin", "tb_data/x/layer005.bin"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel  # seeded random init
    assert tool.main(SMALL_ARGS + ["--out", str(a)]) == 2
    _one_line(capsys, str(a), "not empty", "--overwrite")
    (a / "notes.txt").write_text("mine")
    (a / "tb_data" / "stale").mkdir()
    assert tool.main(SMALL_ARGS + ["--out", str(a), "--overwrite", "--seed", "1"]) == 0
    assert (a / "notes.txt").read_text() == "mine" and not (a / "tb_data" / "stale").exists()
    assert (a / "firmware/weights/weights.bin").read_bytes() != (b / "firmware/weights/weights.bin").read_bytes()


def test_cli_every_flag_has_help_with_default():
    """Issue 16 item 19: every flag of tools/export_hls.py says what it does and its default."""
    flags = [a for a in cli().build_parser()._actions if a.option_strings and "-h" not in a.option_strings]
    assert len(flags) > 20
    for a in flags:
        assert a.help and ("default" in a.help or "required" in a.help), a.option_strings


def test_outputs_named_after_what_they_are(tmp_path, capsys):
    """Issue 16 item 13: a registered model's shared classifier is not a 'semseg' output: the report names it."""
    args = ["--model", "m3vit_tiny_patch16_224"] + [f"--set={k}={json.dumps(v)}" for k, v in SMALL.items()]
    args += ["--set=num_classes=7", '--set=tasks=["semseg"]', "--task", "semseg", "--eval-images", "1"]
    assert cli().main(args + ["--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    line = [x for x in out.splitlines() if x.startswith("fixed point vs PyTorch float")][0]
    assert "classifier-head top-1 agreement" in line and "top-1 agreement with float" not in out
    assert "output: 7 logits of the model's own classifier 'head' (shared by every task)" in out
    meta = json.loads((tmp_path / "o" / "project.json").read_text())
    assert meta["accuracy"]["semseg"]["output"] == "classifier-head logits"


def _stem_checkpoint(tmp: Path) -> Path:
    """A checkpoint of the quickstart's kind (conv stem, classification + semseg heads, built-in data), small."""
    from vision_moe.config import config_from_dict
    from vision_moe.engine.checkpoint import save_checkpoint
    from vision_moe.engine.trainer import build_model_from_config, model_config

    kw = dict(SMALL, stem_channels=[8, 8], stem_strides=[2, 2, 2])
    kw.pop("img_size")
    cfg = config_from_dict(
        {
            "model": {"backbone": "m3vit_tiny_patch16_224", "img_size": 32, "head": "linear", "backbone_kwargs": kw},
            "tasks": {"classification": {}, "semseg": {}},
            "data": {
                "datasets": [{"format": "builtin", "root": str(tmp / "data"), "num_train": 4, "num_val": 4, "seed": 0}],
                "eval_batch_size": 2,
                "num_workers": 0,
            },
            "train": {"steps": 1, "threads": 1},
        }
    )
    mc = model_config(cfg, {"classification": 5, "semseg": 6})  # the built-in data's classes
    torch.manual_seed(0)
    return save_checkpoint(tmp / "ck", build_model_from_config(mc), mc)


def test_docs_first_command_on_a_conv_stem_checkpoint(tmp_path, capsys):
    """docs/hls.md's first command, on a checkpoint of the kind the shipped configs train (issue 16 item 3):
    exported, and the held-out images scored by the checkpoint's own heads on the fixed-point backbone."""
    text = (ROOT / "docs" / "hls.md").read_text()
    first = re.search(r"```bash\n(.*?)\n", text, flags=re.S).group(1)
    words = shlex.split(first.split("#")[0])
    assert words[:2] == ["python", "tools/export_hls.py"] and "--checkpoint" in words
    ck = _stem_checkpoint(tmp_path)
    words[words.index("--checkpoint") + 1] = str(ck)
    words[words.index("--out") + 1] = str(tmp_path / "prj")
    assert cli().main(words[2:]) == 0
    out = capsys.readouterr().out
    assert "conv stem 3 stages" in out and "agreement with float" in out
    assert (tmp_path / "prj" / "firmware" / "vmoe" / "conv.h").is_file()


@pytest.mark.slow
@needs_gxx
def test_m3vit_tiny_real_size(tmp_path):
    torch.manual_seed(0)
    m = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=["semseg", "depth"]).eval()
    proj = export_hls(m, "semseg", tmp_path, HLSConfig(), name="m3vit_tiny_patch16_224", num_eval_images=1)
    print("\n" + proj.summary())
    exe = compile_csim(tmp_path, opt="-O2")
    r = run_csim(exe, tmp_path, every=7, timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:]
    assert r.stdout.count("bit-exact") == len(proj.layer_names) + len(
        {i for i in range(len(proj.layer_names)) if i % 7 == 0} | {len(proj.layer_names) - 1}
    )


@pytest.mark.slow
@needs_gxx
def test_edge_moe_preset_real_size(tmp_path, capsys):
    """Edge-MoE's full configuration (12 layers), every layer bit-exact, the side-by-side table printed."""
    out = tmp_path / "edge"
    assert cli().main(["--preset", "edge-moe", "--out", str(out), "--eval-images", "1", "--csim"]) == 0
    text = capsys.readouterr().out
    print(text)
    assert "PASS" in text.splitlines()[-1]


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
