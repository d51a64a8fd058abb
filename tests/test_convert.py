"""Converters, tested on synthetic state dicts in each source's exact layout (key names, shapes, file structure as
the reference code writes them) against a forward pass written here from the source's semantics."""

import argparse
import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from tool_loader import tool_main

import vision_moe
from vision_moe.deploy.edge_moe import EDGE_MOE, edge_moe_files, read_edge_moe, write_edge_moe
from vision_moe.models.convert import ConversionError, read_m3vit, read_modsquad, remap_m3vit, remap_modsquad

D, P, HEADS = 32, 8, 2
IMG = (16, 32)  # a 2 x 4 grid: not square, so the image size is given
GRID = (IMG[0] // P) * (IMG[1] // P)


def _r(*shape):
    return torch.randn(*shape) * 0.3


def _vit_common(depth: int) -> dict:
    sd = {"patch_embed.proj.weight": _r(D, 3, P, P), "patch_embed.proj.bias": _r(D), "cls_token": _r(1, 1, D)}
    sd["pos_embed"] = _r(1, GRID + 1, D)
    for i in range(depth):
        for n in ("norm1", "norm2"):
            sd[f"blocks.{i}.{n}.weight"], sd[f"blocks.{i}.{n}.bias"] = 1 + _r(D), _r(D)
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, (D,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def _embed(x, sd):
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    return torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), t], 1) + sd["pos_embed"]


def _mha(h, qkv_w, qkv_b, proj_w, proj_b, heads, hd):
    b, n, _ = h.shape
    q, k, v = F.linear(h, qkv_w, qkv_b).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, heads * hd)
    return F.linear(a, proj_w, proj_b)


def _topk(logits, k):
    probs = logits.softmax(-1)  # softmax over all experts, top-k, not renormalised (V-MoE, M³ViT, Mod-Squad)
    w, idx = probs.topk(k, -1)
    return w, idx


# ---------------------------------------------------------------------- M³ViT
E, H_EXP, H_DENSE, TOP_K, TASKS = 4, 16, 64, 2, ("semseg", "depth")


def m3vit_state(depth: int = 4, multi_gate: bool = True, task_dim: int = 6) -> dict:
    """M³ViT's MultiTaskModel under DDP: 'module.backbone.*' (VisionTransformerMoE, MoE in odd blocks with FastMoE's
    experts (E, out, in) and V-MoE gates), 'module.decoders.<task>.*'."""
    sd = _vit_common(depth)
    for i in range(depth):
        p = f"blocks.{i}."
        sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = _r(3 * D, D), _r(3 * D)
        sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = _r(D, D), _r(D)
        if i % 2 == 0:
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _r(H_DENSE, D), _r(H_DENSE)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _r(D, H_DENSE), _r(D)
            continue
        sd[p + "mlp.experts.htoh4.weight"], sd[p + "mlp.experts.htoh4.bias"] = _r(E, H_EXP, D), _r(E, H_EXP)
        sd[p + "mlp.experts.h4toh.weight"], sd[p + "mlp.experts.h4toh.bias"] = _r(E, D, H_EXP), _r(E, D)
        if multi_gate:
            for t in range(len(TASKS)):
                sd[f"{p}mlp.gate.{t}.w_gate"] = _r(D, E) * 5
        else:
            sd[p + "mlp.gate.w_gate"] = _r(D + task_dim, E) * 5
    if not multi_gate:
        g = "gate_task_represent."
        sd[g + "fc1.weight"], sd[g + "fc1.bias"] = _r(task_dim, len(TASKS)), _r(task_dim)
        sd[g + "fc2.weight"], sd[g + "fc2.bias"] = _r(task_dim, task_dim), _r(task_dim)
        sd[g + "norm.weight"], sd[g + "norm.bias"] = 1 + _r(task_dim), _r(task_dim)
    out = {f"module.backbone.{k}": v for k, v in sd.items()}
    for t in TASKS:
        out[f"module.decoders.{t}.conv_0.weight"] = _r(8, D, 3, 3)
    return out


def m3vit_forward(state: dict, x: torch.Tensor, task: int, depth: int = 4) -> torch.Tensor:
    """VisionTransformerMoE.forward_features: tokens after the last block, no final norm."""
    sd = {k.removeprefix("module.backbone."): v for k, v in state.items()}
    x = _embed(x, sd)
    for i in range(depth):
        p = f"blocks.{i}."
        h = _ln(x, sd, p + "norm1")
        x = x + _mha(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"], sd[p + "attn.proj.weight"],
                     sd[p + "attn.proj.bias"], HEADS, D // HEADS)  # fmt: skip
        h = _ln(x, sd, p + "norm2")
        if i % 2 == 0:
            x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                             sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])  # fmt: skip
            continue
        if f"{p}mlp.gate.0.w_gate" in sd:
            logits = h @ sd[f"{p}mlp.gate.{task}.w_gate"]
        else:
            g = "gate_task_represent."
            one = F.one_hot(torch.tensor(task), len(TASKS)).float()
            feat = F.linear(F.gelu(F.linear(one, sd[g + "fc1.weight"], sd[g + "fc1.bias"])), sd[g + "fc2.weight"],
                            sd[g + "fc2.bias"])  # fmt: skip
            feat = F.layer_norm(feat, feat.shape, sd[g + "norm.weight"], sd[g + "norm.bias"], eps=1e-6)
            logits = torch.cat([h, feat.expand(*h.shape[:-1], -1)], -1) @ sd[p + "mlp.gate.w_gate"]
        w, idx = _topk(logits, TOP_K)
        y = torch.zeros_like(h)
        for j in range(TOP_K):
            e = idx[..., j]
            hid = F.gelu(torch.einsum("bnd,bnhd->bnh", h, sd[p + "mlp.experts.htoh4.weight"][e]) +
                         sd[p + "mlp.experts.htoh4.bias"][e])  # fmt: skip
            out = torch.einsum("bnh,bndh->bnd", hid, sd[p + "mlp.experts.h4toh.weight"][e])
            y = y + w[..., j : j + 1] * (out + sd[p + "mlp.experts.h4toh.bias"][e])
        x = x + y
    return x


def _tokens(model, x, task):
    (spatial, prefix), *_ = model.forward_intermediates(
        x, task, indices=1, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    return torch.cat([prefix, spatial], 1)


@pytest.mark.parametrize("multi_gate", [True, False])
def test_m3vit_fastmoe_shards_convert_and_compute_the_reference(tmp_path, multi_gate):
    torch.manual_seed(0)
    state = m3vit_state(multi_gate=multi_gate)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    # save_moe_model_to_dir: 0.pth holds everything with rank 0's experts; 1.pth only rank 1's expert tensors
    expert = [k for k in state if "mlp.experts.htoh4" in k or "mlp.experts.h4toh" in k]
    rank0 = {k: (v[: E // 2] if k in expert else v) for k, v in state.items()}
    torch.save({"epoch": 3, "backbone": "VisionTransformer_moe", "state_dict": rank0}, folder / "0.pth")
    torch.save({"epoch": 3, "state_dict": {k: state[k][E // 2 :] for k in expert}}, folder / "1.pth")
    merged = read_m3vit(folder)
    assert all(torch.equal(merged[k], v) for k, v in state.items())
    conv = remap_m3vit(merged, str(folder), num_heads=HEADS, top_k=TOP_K, img_size=IMG)
    model = conv.build().eval()
    assert model.tasks == TASKS  # from the decoders' order
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        for t, name in enumerate(TASKS):
            torch.testing.assert_close(_tokens(model, x, name), m3vit_forward(state, x, t), atol=1e-5, rtol=1e-5)
    report = conv.report()
    assert "module.decoders" not in report or "decoders.*: the reference's task decoders" in report
    assert "experts.{htoh4,h4toh}" in report and "norm: M³ViT's backbone has none" in report


def test_m3vit_converter_names_bad_keys_and_wrong_sources(tmp_path):
    torch.manual_seed(0)
    state = m3vit_state()
    bad = dict(state)
    bad["module.backbone.blocks.1.mlp.experts.h4toh.weight"] = _r(E, D, H_EXP + 1)
    with pytest.raises(ConversionError, match=r"^src: blocks.1.mlp.experts.h4toh.weight has shape \(4, 32, 17\), "
                       r"expected \(4, 32, 16\)$"):  # fmt: skip
        remap_m3vit(bad, "src", img_size=IMG)
    del bad["module.backbone.blocks.3.attn.proj.bias"]
    bad["module.backbone.blocks.1.mlp.experts.h4toh.weight"] = state[
        "module.backbone.blocks.1.mlp.experts.h4toh.weight"
    ]
    with pytest.raises(ConversionError, match=r"^src: blocks.3.attn.proj.bias is missing \(expected shape \(32,\)\)$"):
        remap_m3vit(bad, "src", img_size=IMG)
    with pytest.raises(ConversionError, match=r"not a square grid; give the training image size"):
        remap_m3vit(state, "src")
    with pytest.raises(ConversionError, match=r"^ms: not an M³ViT FastMoE checkpoint: .*\(a Mod-Squad checkpoint"):
        remap_m3vit(modsquad_state(), "ms")
    (tmp_path / "2.pth").write_bytes(b"")
    with pytest.raises(ConversionError, match=r"expected shards 0.pth, 1.pth, ... \(one per rank\), found \['2.pth'\]"):
        read_m3vit(tmp_path)


# ---------------------------------------------------------------------- Mod-Squad
EA, HD, EM, KM, HM, T_MS = 4, 24, 4, 2, 64, 2  # attention experts and head dim (wider than D / HEADS), MLP experts


def modsquad_state(depth: int = 4) -> dict:
    """MTVisionTransformerMoETaskGating with twice_attn / twice_mlp: MoE attention in even blocks (one query head
    per expert, HEADS of them per token, a shared key/value head), MoE MLP in odd blocks (ParallelExperts (E, in,
    out)); noisy attention gates (2E rows), plain MLP gates; task_embedding (1, T, D)."""
    sd = _vit_common(depth)
    sd["task_embedding"] = _r(1, T_MS, D)
    sd["norm.weight"], sd["norm.bias"] = 1 + _r(D), _r(D)
    sd["fc_norm.weight"], sd["fc_norm.bias"] = 1 + _r(D), _r(D)
    sd["task_heads.0.1.weight"] = _r(P * P, D)
    for i in range(depth):
        p = f"blocks.{i}."
        if i % 2 == 0:
            a = p + "attn.q_proj."
            sd[a + "experts.w"], sd[a + "output_experts.w"] = _r(EA, D, HD), _r(EA, HD, D)
            sd[p + "attn.kv_proj.0.weight"], sd[p + "attn.kv_proj.0.bias"] = _r(2 * HD, D), _r(2 * HD)
            for t in range(T_MS):
                sd[f"{a}f_gate.{t}.0.weight"] = _r(2 * EA, D) * 5
            sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _r(4 * D, D), _r(4 * D)
            sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _r(D, 4 * D), _r(D)
        else:
            sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"] = _r(3 * HEADS * HD, D), _r(3 * HEADS * HD)
            sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"] = _r(D, HEADS * HD), _r(D)
            m = p + "mlp."
            sd[m + "experts.w"], sd[m + "experts.b"] = _r(EM, D, HM), _r(EM, HM)
            sd[m + "output_experts.w"], sd[m + "output_experts.b"] = _r(EM, HM, D), _r(EM, D)
            for t in range(T_MS):
                sd[f"{m}f_gate.{t}.0.weight"] = _r(EM, D) * 5
    return sd


def modsquad_forward(sd: dict, x: torch.Tensor, t: int, depth: int = 4) -> torch.Tensor:
    """MTVisionTransformerMoETaskGating.forward_features for a dense task: norm(x) after the blocks."""
    x = _embed(x, sd)
    for i in range(depth):
        p = f"blocks.{i}."
        x = x + sd["task_embedding"][:, t : t + 1]
        h = _ln(x, sd, p + "norm1")
        if i % 2 == 0:
            a = p + "attn."
            w, idx = _topk(h @ sd[f"{a}q_proj.f_gate.{t}.0.weight"][:EA].t(), HEADS)  # the clean half of the gate
            q = torch.einsum("bnd,bnkdh->bnkh", h, sd[a + "q_proj.experts.w"][idx])  # one head per chosen expert
            k, v = F.linear(h, sd[a + "kv_proj.0.weight"], sd[a + "kv_proj.0.bias"]).chunk(2, -1)
            att = torch.einsum("bikh,bjh->bkij", q, k) * HD**-0.5
            o = torch.einsum("bkij,bjh->bikh", att.softmax(-1), v)
            y = torch.einsum("bnkh,bnkhd->bnkd", o, sd[a + "q_proj.output_experts.w"][idx])
            x = x + (w[..., None] * y).sum(2)
        else:
            x = x + _mha(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"], sd[p + "attn.proj.weight"],
                         sd[p + "attn.proj.bias"], HEADS, HD)  # fmt: skip
        h = _ln(x, sd, p + "norm2")
        if i % 2 == 0:
            x = x + F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                             sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])  # fmt: skip
        else:
            m = p + "mlp."
            w, idx = _topk(h @ sd[f"{m}f_gate.{t}.0.weight"].t(), KM)
            hid = F.gelu(torch.einsum("bnd,bnkdh->bnkh", h, sd[m + "experts.w"][idx]) + sd[m + "experts.b"][idx])
            y = torch.einsum("bnkh,bnkhd->bnkd", hid, sd[m + "output_experts.w"][idx]) + sd[m + "output_experts.b"][idx]
            x = x + (w[..., None] * y).sum(2)
    return _ln(x, sd, "norm")


def test_modsquad_checkpoint_converts_and_computes_the_reference(tmp_path):
    torch.manual_seed(0)
    sd = modsquad_state()
    path = tmp_path / "checkpoint-9.pth"
    args = argparse.Namespace(model="mtvit_taskgate_att_mlp_small_MI_twice", batch_size=8)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 9, "args": args}, path)
    conv = remap_modsquad(read_modsquad(path), str(path), tasks=["normal", "depth_euclidean"], img_size=IMG)
    model = conv.build().eval()
    blk = model.blocks[0].attn
    assert (blk.expert_heads, blk.top_k, blk.head_dim, model.blocks[1].mlp.top_k) == (1, HEADS, HD, KM)
    x = torch.randn(2, 3, *IMG)
    with torch.no_grad():
        for t, name in enumerate(["normal", "depth_euclidean"]):
            torch.testing.assert_close(
                model.forward_features(x, name), modsquad_forward(sd, x, t), atol=1e-5, rtol=1e-5
            )
    report = conv.report()
    assert "fc_norm.weight: the classification head's norm" in report and "task_heads.0.1.weight" in report
    assert "learned noise scale (f_gate rows E..2E) is left out" in report and "adds 1e-4" in report


def test_tool_converts_each_source_and_refuses_the_wrong_one_in_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    tool = tool_main("convert")
    torch.save({"model": modsquad_state()}, tmp_path / "ms.pth")
    torch.save({"state_dict": m3vit_state()}, tmp_path / "m3.pth")
    assert tool(["modsquad", str(tmp_path / "ms.pth"), "--out", str(tmp_path / "ms"), "--img-size", "16", "32"]) == 0
    out = capsys.readouterr().out
    assert "mapped (" in out and "left out (" in out and f"wrote {tmp_path / 'ms'}" in out
    back = vision_moe.create_model(f"local-dir:{tmp_path / 'ms'}", pretrained=True)
    assert type(back).__name__ == "MoEVisionTransformer" and back.tasks == ("task0", "task1")
    again = timm.create_model(f"local-dir:{tmp_path / 'ms'}", pretrained=True)  # timm reads the same folder
    torch.testing.assert_close(again.pos_embed, back.pos_embed)
    assert tool(["m3vit", str(tmp_path / "ms.pth"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'ms.pth'}: not an M³ViT FastMoE checkpoint") and "\n" not in err
    assert not (tmp_path / "x").exists()  # nothing half-written
    (tmp_path / "junk.pth").write_bytes(b"\x80\x02junk" * 10)
    assert tool(["m3vit", str(tmp_path / "junk.pth"), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'junk.pth'}: cannot read a torch checkpoint (") and "\n" not in err


# ---------------------------------------------------------------------- Edge-MoE
@pytest.fixture(scope="module")
def edge_model():
    torch.manual_seed(0)
    model = vision_moe.create_model(
        "m3vit_tiny_patch16_224", tasks=["semseg", "depth"], num_classes=0, img_size=EDGE_MOE["img"], top_k=2,
        expert_hidden=384,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model


def _image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*EDGE_MOE["img"], 3), dtype=np.uint8)


def test_edge_moe_folder_round_trip(edge_model, tmp_path):
    """Export -> import -> export writes the same bytes (the exported values are on Edge-MoE's grids and the
    imported model's normalisation is the identity on its pixels); the imported model computes the original one
    up to the weights' rounding (0.7 % mean error), and the written reference is the original model's output."""
    report = write_edge_moe(edge_model, tmp_path / "a", images=[("noise", _image())])
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    assert set(files) == {f"{n}.float32.bin" for n in edge_moe_files(2)} | {
        "image.float32.bin",
        "l11_x_post_moe.float32.bin",
    }
    conv = read_edge_moe(tmp_path / "a")
    back = conv.build().eval()
    assert back.tasks == ("semseg", "depth") and any("image.float32.bin: test data" in s for s in conv.left_out)
    write_edge_moe(back, tmp_path / "b")
    for name in edge_moe_files(2):
        assert (tmp_path / "b" / f"{name}.float32.bin").read_bytes() == files[f"{name}.float32.bin"], name
    x_edge = torch.from_numpy(np.fromfile(tmp_path / "a" / "image.float32.bin", "<f4").reshape(1, 3, *EDGE_MOE["img"]))
    ref = torch.from_numpy(np.fromfile(tmp_path / "a" / "l11_x_post_moe.float32.bin", "<f4").reshape(129, 192))
    with torch.no_grad():
        mine = _tokens(back, x_edge, "semseg")[0]  # the imported model reads Edge-MoE's pixels as they are
        byte = torch.from_numpy(_image()).permute(2, 0, 1)[None].float()
        want = _tokens(edge_model, (byte / 255 - 0.5) / 0.5, "semseg")[0]
    torch.testing.assert_close(ref, want, atol=1e-5, rtol=0)  # the reference is the model's own output
    err = (mine - want).abs().mean().item()
    assert 0 < err < 0.02 * want.abs().mean().item(), err  # the weights' rounding to 16 bits (and its rare re-routing)
    assert report[0].startswith(f"{len(edge_moe_files(2))} weight files")


def test_edge_moe_export_warns_and_refuses_by_name(edge_model, tmp_path, caplog):
    import copy

    m = copy.deepcopy(edge_model)
    with torch.no_grad():  # every token of block 1's MoE input is the same vector: one expert pair takes all
        m.blocks[1].norm2.weight.zero_()
    report = write_edge_moe(m, tmp_path / "w", images=[("noise", _image())])
    assert any(s.startswith("warning: blocks.1.mlp: expert ") and "receives every token of image 'noise'" in s
               for s in report)  # fmt: skip
    assert "blocks.1.mlp: expert" in caplog.text
    with torch.no_grad():
        m.blocks[0].attn.qkv.weight[0, 0] = 3.0
    with pytest.raises(ValueError, match=r"^l0_qkv_weight.float32.bin: 1 of 110592 values \(max \|v\| = 3\) outside "
                       r"ap_fixed<16, 2>'s range \[-2, 2\)"):  # fmt: skip
        write_edge_moe(m, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    small = vision_moe.create_model("m3vit_tiny_patch16_224", tasks=["a", "b"], depth=2, img_size=EDGE_MOE["img"])
    with pytest.raises(ValueError, match=r"^Edge-MoE cannot run this model: 2 blocks, expected 12$"):
        write_edge_moe(small, tmp_path / "never")


def test_edge_moe_folder_with_a_missing_or_missized_file_is_one_line(edge_model, tmp_path, capsys):
    write_edge_moe(edge_model, tmp_path / "w")
    (tmp_path / "w" / "l3_h4toh_bias.float32.bin").write_bytes(b"\0" * 100)
    with pytest.raises(ConversionError) as e:
        read_edge_moe(tmp_path / "w")
    assert (
        str(e.value) == f"{tmp_path / 'w' / 'l3_h4toh_bias.float32.bin'}: 100 bytes, expected 12288 ((16, 192) float32)"
    )
    (tmp_path / "w" / "l3_h4toh_bias.float32.bin").unlink()
    tool = tool_main("convert")
    assert tool(["edge-moe-import", str(tmp_path / "w"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    missing = tmp_path / "w" / "l3_h4toh_bias.float32.bin"
    assert err == f"error: {missing}: missing; expected 12288 bytes ((16, 192) float32) as Edge-MoE's testbench reads"
    assert not (tmp_path / "o").exists()


def test_training_checkpoint_to_hub_format_in_one_command(tmp_path, capsys):
    """A checkpoint with heads -> Hub format: the whole model comes back from vision_moe.create_model, the backbone
    from timm.create_model, and eval/export's load_model reads the folder."""
    from vision_moe.engine.checkpoint import load_model, save_checkpoint
    from vision_moe.models.multitask import build_multitask_model

    torch.manual_seed(0)
    kw = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2)
    tasks = {"classification": 3, "semseg": 4}
    m = build_multitask_model("m3vit_tiny_patch16_224", tasks, img_size=32, head="linear", **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    cfg = {"model": dict(backbone="m3vit_tiny_patch16_224", tasks=tasks, img_size=32, head="linear", head_kwargs={},
                         backbone_kwargs=kw, mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2])}  # fmt: skip
    ck = save_checkpoint(tmp_path / "ck", m, cfg)
    assert tool_main("convert")(["to-hub", "--checkpoint", str(ck), "--out", str(tmp_path / "hub")]) == 0
    assert "with heads for ['classification', 'semseg']" in capsys.readouterr().out
    hub_cfg = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert hub_cfg["architecture"] == "m3vit_tiny_patch16_224" and hub_cfg["pretrained_cfg"]["mean"] == [0.4] * 3
    assert hub_cfg["model_args"]["tasks"] == ["classification", "semseg"] and hub_cfg["model"] == cfg["model"]
    whole = vision_moe.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    bare = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    again = load_model(tmp_path / "hub")[0].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for task in tasks:
            want = m(x, task)["out"]
            torch.testing.assert_close(whole(x, task)["out"], want)
            torch.testing.assert_close(again(x, task)["out"], want)
        torch.testing.assert_close(bare.forward_features(x, "semseg"), m.backbone.forward_features(x, "semseg"))
    with pytest.raises(ValueError, match=r"a model saved with its heads is rebuilt from its config.json"):
        vision_moe.create_model(f"local-dir:{tmp_path / 'hub'}", tasks=["semseg"])
