"""The zoo: weight tags with real pretrained_cfgs, loaded in one call from a Hugging Face cache snapshot in offline
mode (the layout huggingface_hub reads), and vision-moe models in the Hub format both ways."""

import hashlib
import os
import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from test_hub import _download_tool

import vision_moe
from vision_moe.models.moe_vit import ZOO

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_snapshot(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Write ``files`` as huggingface_hub caches a download: blobs named by their sha256, a snapshot folder of
    relative symlinks for the commit, refs/main naming the commit. Returns the snapshot folder."""
    from huggingface_hub.file_download import repo_folder_name

    root = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snap = root / "snapshots" / COMMIT
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    return snap


@pytest.fixture()
def hf_cache(tmp_path, monkeypatch):
    """huggingface_hub's own cache under tmp_path, offline (no VISION_MOE_CACHE: the default Hub cache is used)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("VISION_MOE_CACHE", raising=False)
    monkeypatch.delenv("VISION_MOE_OFFLINE", raising=False)
    return cache


def _dense_tiny(depth: int = 2):
    torch.manual_seed(0)
    dense = timm.create_model("vit_tiny_patch16_224", depth=depth).eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return dense


def _safetensors_bytes(tmp_path: Path, state: dict) -> bytes:
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    return f.read_bytes()


def test_every_tag_has_the_dense_sources_pretrained_cfg():
    assert len(ZOO) == 30
    for tag, z in ZOO.items():
        cfg = timm.models.get_pretrained_cfg(tag)
        src = timm.models.get_pretrained_cfg(z.source)
        assert cfg is not None and src is not None, tag
        assert cfg.hf_hub_id == src.hf_hub_id and cfg.hf_hub_id.startswith("timm/"), tag
        assert (cfg.mean, cfg.std, cfg.input_size, cfg.license, cfg.num_classes) == (
            src.mean,
            src.std,
            src.input_size,
            src.license,
            src.num_classes,
        ), tag
    assert set(vision_moe.list_pretrained("m3vit_small*")) == {
        f"m3vit_small_patch16_224.{t}" for t in ("augreg_in21k_ft_in1k", "augreg_in21k", "augreg_in1k", "deit_in1k")
    }
    # the default tag (pretrained=True without a tag) is each architecture's first
    assert timm.models.get_pretrained_cfg("m3vit_small_patch16_224").tag == "augreg_in21k_ft_in1k"


def test_a_tag_loads_in_one_call_from_the_hub_cache_offline(hf_cache, tmp_path):
    """The dense ViT-Ti as huggingface_hub caches it; create_model(tag, pretrained=True) (vision-moe's and timm's,
    and the plain name, which loads the default tag) upcycles it and equals it."""
    from huggingface_hub import scan_cache_dir

    dense = _dense_tiny()
    repo = "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snap = write_hub_snapshot(hf_cache, repo, {"model.safetensors": _safetensors_bytes(tmp_path, dense.state_dict())})
    seen = {r.repo_id: {f.file_name for rev in r.revisions for f in rev.files} for r in scan_cache_dir(hf_cache).repos}
    assert seen == {repo: {"model.safetensors"}}  # huggingface_hub reads the layout the test wrote
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = dense(x)
        for make in (vision_moe.create_model, timm.create_model):
            for name in ("m3vit_tiny_patch16_224.augreg_in21k_ft_in1k", "m3vit_tiny_patch16_224"):
                model = make(name, pretrained=True, depth=2).eval()
                torch.testing.assert_close(model(x, task="semseg"), want, atol=1e-5, rtol=0)
                assert model.pretrained_cfg["hf_hub_id"] == repo and "file" not in model.pretrained_cfg
    assert snap.is_dir()


def test_offline_and_missing_or_corrupt_cache_files_are_one_line(hf_cache, tmp_path):
    name = "m3vit_tiny_patch16_224.augreg_in21k"
    with pytest.raises(FileNotFoundError) as e:
        vision_moe.create_model(name, pretrained=True, depth=2)
    assert str(e.value) == (
        f"offline (HF_HUB_OFFLINE=1): timm/vit_tiny_patch16_224.augreg_in21k/model.safetensors is not in the cache "
        f"{hf_cache}; download it once with network access (python tools/download.py {name}) or unset HF_HUB_OFFLINE"
    )
    data = _safetensors_bytes(tmp_path, _dense_tiny().state_dict())
    snap = write_hub_snapshot(hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k", {"model.safetensors": data[:5000]})
    with pytest.raises(ValueError) as e:
        vision_moe.create_model(name, pretrained=True, depth=2)
    msg = str(e.value)
    assert msg.startswith(f"{snap / 'model.safetensors'}: cannot read pretrained weights (") and "\n" not in msg
    assert msg.endswith(f"delete {(snap / 'model.safetensors').resolve()} (its blob in the Hugging Face cache) to "
                        "download it again")  # fmt: skip


def test_unknown_names_list_the_close_matches():
    with pytest.raises(ValueError) as e:
        vision_moe.create_model("m3vit_small_patch16_224.augreg_in21k_ft_in1")
    assert str(e.value).startswith(
        "unknown weight tag 'm3vit_small_patch16_224.augreg_in21k_ft_in1'; close matches: "
        "['m3vit_small_patch16_224.augreg_in21k_ft_in1k'"
    )
    with pytest.raises(ValueError, match=r"^unknown weight tag 'm3vit_small_patch16_224.nope'; close matches: \["):
        timm.create_model("m3vit_small_patch16_224.nope")  # timm alone would fall back to random weights
    with pytest.raises(ValueError, match=r"^unknown model 'm3vit_smal_patch16_224'; close matches: \['m3vit_small_pa"):
        vision_moe.create_model("m3vit_smal_patch16_224")


def test_a_tag_fixes_the_architecture_its_weights_need():
    meta = dict(depth=2, img_size=32)
    plain = vision_moe.create_model("m3vit_small_patch16_224", **meta)
    tagged = vision_moe.create_model("m3vit_small_patch16_224.deit_in1k", **meta)
    assert plain.blocks[0].attn.num_heads == 12 and tagged.blocks[0].attn.num_heads == 6  # timm's ViT-S: 6 heads
    assert plain.blocks[1].mlp.router.gates["semseg"].proj.bias is None
    assert tagged.blocks[1].mlp.router.gates["semseg"].proj.bias is not None  # the exact split's constant input
    own = vision_moe.create_model("m3vit_small_patch16_224.deit_in1k", num_heads=4, **meta)
    assert own.blocks[0].attn.num_heads == 4  # the caller's arguments win
    ms = vision_moe.create_model("modsquad_small_patch16_224.augreg_in1k", depth=2, img_size=32)
    attn = ms.blocks[1].attn
    assert (attn.expert_heads, attn.top_k) == (6, 1) and ms.blocks[1].mlp.router.gates["semseg"].proj.bias is not None


def test_download_list_shows_every_tag_and_its_source(capsys):
    assert _download_tool("--list") == 0
    out = capsys.readouterr().out
    for tag, z in ZOO.items():
        line = next(ln for ln in out.splitlines() if ln.split()[:1] == [tag])
        assert z.source in line and "apache-2.0" in line, line
    assert re.search(r"m3vit_small_patch16_224\.augreg_in21k_ft_in1k\s+timm/vit_small_patch16_224", out)


def test_a_training_run_starts_from_a_weight_tag(hf_cache, tmp_path):
    """model.backbone: a tag + model.pretrained: the trainer's backbone is the upcycled dense ViT; a resumed run and
    load_model rebuild the same architecture from the tag (a plain name with pretrained is refused)."""
    from test_train import tiny

    from vision_moe.config import ConfigError, config_from_dict
    from vision_moe.engine.trainer import Trainer

    dense = _dense_tiny()
    write_hub_snapshot(hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                       {"model.safetensors": _safetensors_bytes(tmp_path, dense.state_dict())})  # fmt: skip
    cfg = tiny(tmp_path / "data", model={"backbone": "m3vit_tiny_patch16_224.augreg_in21k_ft_in1k", "pretrained": True,
                                         "img_size": 32, "backbone_kwargs": {"depth": 2}})  # fmt: skip
    tr = Trainer(config_from_dict(cfg), tmp_path / "run")
    bb = tr.model.backbone
    assert torch.equal(bb.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
    with torch.no_grad():  # the upcycled MoE block computes the dense one
        h = torch.randn(1, 5, 192)
        dense_mlp = dense.blocks[1].mlp(dense.blocks[1].norm2(h))
        moe_mlp, _ = bb.blocks[1].mlp(bb.blocks[1].norm2(h), "semseg")
    torch.testing.assert_close(moe_mlp, dense_mlp, atol=1e-5, rtol=0)
    cfg["model"]["backbone"] = "m3vit_tiny_patch16_224"
    with pytest.raises(ConfigError, match=r"model.pretrained: needs a weight tag as model.backbone"):
        config_from_dict(cfg)


def test_readme_zoo_table_lists_every_tag_with_its_source_licence_params_and_exactness():
    """The table benchmarks/zoo_table.py printed: its rows are the registry's tags, sources, licences and exactness,
    and its parameter counts those of the architectures the tags build (counted on the meta device)."""
    text = (ROOT / "README.md").read_text()
    row = r"^\| `([\w.]+)` \| \[([^\]]+)\]\(https://huggingface\.co/\2\) \| ([\w.-]+) \| ([\d.]+) \| ([\d.]+)"
    row += r" \| (\w+) \|$"
    rows = re.findall(row, text, flags=re.M)
    assert [r[0] for r in rows] == list(ZOO)
    counted = {}
    for tag, hub_id, licence, params, _gflops, exact in rows:
        cfg = timm.models.get_pretrained_cfg(tag)
        assert (hub_id, licence, exact) == (cfg.hf_hub_id, cfg.license, "yes" if ZOO[tag].exact else "no"), tag
        key = (tag.split(".")[0], repr(sorted(ZOO[tag].model_args.items())))
        if key not in counted:
            with torch.device("meta"):
                m = vision_moe.create_model(tag, tasks=("semseg", "depth"), num_classes=0)
            counted[key] = sum(p.numel() for p in m.parameters()) / 1e6
        assert params == f"{counted[key]:.2f}", tag


def test_a_saved_multitask_model_loads_from_the_hub_by_name(hf_cache, tmp_path, capsys):
    """save_pretrained's folder as huggingface_hub caches an upload: hf-hub:ORG/NAME gives the whole multi-task
    model to vision-moe and the backbone to timm, offline; download.py fetches both files by the same name."""
    from vision_moe.models.multitask import build_multitask_model

    torch.manual_seed(0)
    kw = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, num_experts=4, top_k=2)
    tasks = {"semseg": 3, "depth": None}
    m = build_multitask_model("m3vit_tiny_patch16_224", tasks, img_size=32, head="linear", **kw).eval()
    section = dict(backbone="m3vit_tiny_patch16_224", tasks=tasks, img_size=32, head="linear", backbone_kwargs=kw)
    vision_moe.save_pretrained(m, tmp_path / "up", config={"model": section})
    files = {f.name: f.read_bytes() for f in (tmp_path / "up").iterdir()}
    assert sorted(files) == ["config.json", "model.safetensors"]
    snap = write_hub_snapshot(hf_cache, "someone/m3vit-demo", files)
    whole = vision_moe.create_model("hf-hub:someone/m3vit-demo", pretrained=True).eval()
    bare = timm.create_model("hf-hub:someone/m3vit-demo", pretrained=True).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for task in tasks:
            torch.testing.assert_close(whole(x, task)["out"], m(x, task)["out"])
        torch.testing.assert_close(bare.forward_features(x, "depth"), m.backbone.forward_features(x, "depth"))
    assert _download_tool("hf-hub:someone/m3vit-demo") == 0
    assert capsys.readouterr().out.strip() == str(snap)
