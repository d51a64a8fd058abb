"""Restoration data: each on-disk format from a tiny fixture written in that exact layout, bad input handled (a
missing ground truth skipped and counted, grey / RGBA converted, a size mismatch a counted bad sample), the
built-in degraded photographs (split by photograph, deterministic, cached), the paired transform."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vision_moe.data import BadSampleError
from vision_moe.data.builtin_restore import (
    BUILTIN_DEGRADATIONS,
    DEGRADE,
    HELD_OUT_PHOTOS,
    TRAIN_PHOTOS,
    BuiltinRestoration,
    prepare_builtin_restore,
)
from vision_moe.data.restoration import RestorationTransform, restoration_dataset
from vision_moe.engine.data import split_by_task


def _png(path, hw=(24, 20), mode="RGB", value=None, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ch = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (*hw, ch), dtype=np.uint8) if value is None else np.full((*hw, ch), value, np.uint8)
    Image.fromarray(arr[..., 0] if ch == 1 else arr, mode).save(path)
    return path


def test_paired_folders_basicsr_layout(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / "lq" / f"{i:03d}.png", seed=i)
        _png(tmp_path / "train" / "gt" / f"{i:03d}.png", seed=10 + i)
    _png(tmp_path / "train" / "lq" / "orphan.png")  # no ground truth: left out and counted
    _png(tmp_path / "train" / "lq" / "grey.png", mode="L")  # grey input, RGBA ground truth: converted to RGB
    _png(tmp_path / "train" / "gt" / "grey.png", mode="RGBA")
    ds = restoration_dataset("paired", tmp_path, "train", ["derain"])
    assert len(ds) == 4 and ds.sample_tasks == ["derain"] * 4
    assert ds.skipped == [
        (str(tmp_path / "train" / "lq" / "orphan.png"), f"no ground truth orphan.* in {tmp_path / 'train' / 'gt'}")
    ]
    image, target = ds[[s.name for s in ds.samples].index("grey.png")]
    assert image.shape == (3, 24, 20) and target["gt"].shape == (3, 24, 20) and target["degradation"] == "derain"
    torch.testing.assert_close(target["lq"], image * 0.5 + 0.5)  # eval: the input in [0, 1] for the baseline
    assert target["gt"].min() >= 0 and target["gt"].max() <= 1
    with pytest.raises(ValueError, match="holds one degradation"):
        restoration_dataset("paired", tmp_path, "train", ["derain", "dehaze"])
    with pytest.raises(ValueError, match="'deblurr' is not a degradation"):
        restoration_dataset("paired", tmp_path, "train", ["deblurr"])


def test_size_mismatch_is_a_counted_bad_sample(tmp_path):
    _png(tmp_path / "val" / "lq" / "a.png", hw=(16, 16))
    _png(tmp_path / "val" / "gt" / "a.png", hw=(16, 18))
    _png(tmp_path / "val" / "lq" / "b.png")
    (tmp_path / "val" / "gt" / "b.png").write_bytes(b"not a png")
    ds = restoration_dataset("paired", tmp_path, "val", ["denoise"])
    with pytest.raises(BadSampleError, match=r"a.png: size 16x16 differs from its ground truth .*a.png \(18x16\)"):
        ds[0]
    with pytest.raises(BadSampleError, match="b.png: cannot decode image"):
        ds[1]


def test_allweather_list_file(tmp_path):
    for name in ("im_0001.png", "im_0002.png", "snow_01.png"):
        _png(tmp_path / "input" / name)
        _png(tmp_path / "gt" / name, seed=3)
    _png(tmp_path / "input" / "im_0003.png")  # listed, ground truth missing
    (tmp_path / "allweather.txt").write_text(
        "input/im_0001.png\ninput/im_0002.png\n\ninput/snow_01.png desnow\ninput/im_0003.png\n"
    )
    ds = restoration_dataset("allweather", tmp_path, "allweather", ["derain"])  # unnamed lines: derain
    assert [s.name for s in ds.samples] == ["im_0001.png", "im_0002.png"] and len(ds.skipped) == 1
    assert ds.samples[0].gt == tmp_path / "gt" / "im_0001.png"
    snow = restoration_dataset("allweather", tmp_path, "allweather", ["desnow"])
    assert snow.sample_tasks == ["desnow"] * 3  # the named line, and the unnamed ones under the set's one task
    with pytest.raises(ValueError, match="allweather.txt:1: no degradation on the line"):
        restoration_dataset("allweather", tmp_path, "allweather", ["derain", "desnow"])
    (tmp_path / "bad.txt").write_text("input/im_0001.png derain extra\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: .*expected '<input path> \[degradation\]'"):
        restoration_dataset("allweather", tmp_path, "bad", ["derain"])
    (tmp_path / "noinput.txt").write_text("images/im_0001.png\n")
    with pytest.raises(ValueError, match="noinput.txt:1: .*has no 'input' folder"):
        restoration_dataset("allweather", tmp_path, "noinput", ["derain"])


def test_gopro_layout(tmp_path):
    for seq in ("GOPR0372_07_00", "GOPR0374_11_01"):
        for i in range(2):
            _png(tmp_path / "test" / seq / "blur" / f"{i:06d}.png")
            _png(tmp_path / "test" / seq / "sharp" / f"{i:06d}.png", seed=5)
        _png(tmp_path / "test" / seq / "blur_gamma" / "000000.png")  # GoPro's gamma variant: not read
    ds = restoration_dataset("gopro", tmp_path, "test", ["deblur"])
    assert len(ds) == 4 and set(ds.sample_tasks) == {"deblur"}
    assert ds.samples[0].name == "GOPR0372_07_00_000000.png"


def test_all_in_one_layout_and_split_by_task(tmp_path):
    for deg, n in (("derain", 2), ("lowlight", 3)):
        for i in range(n):
            _png(tmp_path / "train" / deg / "lq" / f"{i}.png")
            _png(tmp_path / "train" / deg / "gt" / f"{i}.png")
    ds = restoration_dataset("all_in_one", tmp_path, "train", ["derain", "lowlight"])
    assert ds.sample_tasks == ["derain"] * 2 + ["lowlight"] * 3
    parts = split_by_task(ds, ["lowlight", "derain"])
    assert [(len(sub), tasks) for sub, tasks in parts] == [(3, ["lowlight"]), (2, ["derain"])]
    assert all(sub[i][1]["degradation"] == t[0] for sub, t in parts for i in range(len(sub)))
    only = restoration_dataset("all_in_one", tmp_path, "train", ["lowlight"])
    assert len(only) == 3
    (tmp_path / "train" / "fog").mkdir()
    with pytest.raises(ValueError, match="fog: folder name: 'fog' is not a degradation"):
        restoration_dataset("all_in_one", tmp_path, "train", ["derain"])


def test_paired_transform_crops_both_alike():
    lq = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(40, 30, 3)
    tf = RestorationTransform(train=True, img_size=16, seed=3)
    img, target = tf(lq, lq.copy())
    assert img.shape == (3, 16, 16) and "lq" not in target
    torch.testing.assert_close(img * 0.5 + 0.5, target["gt"])  # the same crop and flip of both
    small = RestorationTransform(train=True, img_size=48)(lq, lq)[0]  # smaller than the crop: reflect-padded
    assert small.shape == (3, 48, 48)
    with pytest.raises(ValueError, match="needs an img_size"):
        RestorationTransform(train=True, img_size=None)


def test_every_degradation_is_deterministic_and_degrades():
    from skimage import data

    clean = data.astronaut()[100:164, 200:264].astype(np.float32) / 255.0
    assert set(DEGRADE) == set(BUILTIN_DEGRADATIONS)
    for name, fn in DEGRADE.items():
        a, pa = fn(clean, np.random.default_rng(7))
        b, pb = fn(clean, np.random.default_rng(7))
        assert np.array_equal(a, b) and pa == pb, name
        err = np.abs(np.clip(a, 0, 1) - clean).mean()
        assert 0.003 < err < 0.5, (name, err)


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory):
    return prepare_builtin_restore(tmp_path_factory.mktemp("restore"), num_train=2, num_val=2, img_size=32)


def test_builtin_split_by_photograph_deterministic_and_cached(builtin_root, tmp_path):
    man = json.loads((builtin_root / "manifest.json").read_text())
    assert set(man["val_input_baseline"]) == set(BUILTIN_DEGRADATIONS)
    assert all(0 < v["input_psnr"] < 60 and 0 < v["input_ssim"] < 1 for v in man["val_input_baseline"].values())
    used = {}
    for split in ("train", "val"):
        rows = [json.loads(line) for line in (builtin_root / split / "crops.jsonl").read_text().splitlines()]
        assert len(rows) == 2 * len(BUILTIN_DEGRADATIONS)
        used[split] = {r["crop"]["photo"] for r in rows}
    assert used["train"] <= set(TRAIN_PHOTOS) and used["val"] <= set(HELD_OUT_PHOTOS)
    assert not set(TRAIN_PHOTOS) & set(HELD_OUT_PHOTOS)  # no held-out photograph is ever cropped for training
    again = prepare_builtin_restore(tmp_path, num_train=2, num_val=2, img_size=32)
    assert json.loads((again / "manifest.json").read_text())["sha256"] == man["sha256"]  # same bytes from the seed
    stamp = (builtin_root / "manifest.json").stat().st_mtime_ns
    assert prepare_builtin_restore(builtin_root.parent, num_train=2, num_val=2, img_size=32) == builtin_root
    assert (builtin_root / "manifest.json").stat().st_mtime_ns == stamp  # reused, not regenerated
    ds = BuiltinRestoration(builtin_root, "val", tasks=["dehaze", "denoise"])
    assert len(ds) == 4 and ds.uniform_size and ds[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="no \\['deraindrop'\\] crops"):
        BuiltinRestoration(builtin_root, "val", tasks=["deraindrop"])


def test_builtin_linear_motion_kernel_changes_only_the_deblur_crops(builtin_root):
    from vision_moe.config import MOTION_KERNELS as CONFIG_KERNELS
    from vision_moe.data.builtin_restore import MOTION_KERNELS

    assert tuple(MOTION_KERNELS) == CONFIG_KERNELS  # the config's check and the generator agree
    lin = prepare_builtin_restore(builtin_root.parent, num_train=2, num_val=2, img_size=32, motion_kernel="linear")
    assert lin != builtin_root and lin.name.endswith("_motion-linear")
    assert json.loads((lin / "manifest.json").read_text())["params"]["motion_kernel"] == "linear"
    for split in ("train", "val"):
        for deg in BUILTIN_DEGRADATIONS:
            for sub in ("lq", "gt"):
                a, b = (np.asarray(Image.open(r / split / deg / sub / "000001.png")) for r in (builtin_root, lin))
                assert np.array_equal(a, b) == (deg != "deblur" or sub == "gt"), (split, deg, sub)
        rows = [json.loads(line) for line in (lin / split / "crops.jsonl").read_text().splitlines()]
        assert all(0 <= r["params"]["angle"] < 180 for r in rows if r["degradation"] == "deblur")
    # a straight kernel: all of its mass on one line through the centre
    k = np.zeros((15, 15), np.float32)
    k[7, 7] = 1
    out, p = MOTION_KERNELS["linear"](k[..., None].repeat(3, 2), np.random.default_rng(3))
    ys, xs = np.nonzero(out[..., 0] > 1e-3)
    centred = np.stack([xs - 7, ys - 7], 1).astype(float)
    assert np.linalg.svd(centred, compute_uv=False)[1] < 0.2 * np.linalg.svd(centred, compute_uv=False)[0], p
    with pytest.raises(ValueError, match="motion_kernel='curly'; expected one of \\['trajectory', 'linear'\\]"):
        prepare_builtin_restore(builtin_root.parent, num_train=2, num_val=2, img_size=32, motion_kernel="curly")


def test_builtin_raindrops_add_a_degradation_and_change_nothing_else(builtin_root):
    """raindrops=True: a folder of its own with deraindrop crops besides the default's, every other crop byte-equal
    to the default data's; a drop changes the image where it sits (the scene upside down and defocused), and only
    there; the default data asked for raindrops says how to get them; the config takes the option for the
    built-in data only."""
    from vision_moe.config import ConfigError, config_from_dict
    from vision_moe.data.builtin_restore import RAINDROP, _raindrops

    drops = prepare_builtin_restore(builtin_root.parent, num_train=2, num_val=2, img_size=32, raindrops=True)
    assert drops != builtin_root and drops.name.endswith("_raindrops")
    man = json.loads((drops / "manifest.json").read_text())
    assert man["degradations"] == [*BUILTIN_DEGRADATIONS, RAINDROP] and RAINDROP in man["val_input_baseline"]
    for split in ("train", "val"):
        for deg in BUILTIN_DEGRADATIONS:
            for sub in ("lq", "gt"):
                a, b = (np.asarray(Image.open(r / split / deg / sub / "000001.png")) for r in (builtin_root, drops))
                assert np.array_equal(a, b), (split, deg, sub)
    ds = BuiltinRestoration(drops, "val", tasks=[RAINDROP])
    assert len(ds) == 2 and ds[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="no \\['deraindrop'\\] crops.*raindrops: true"):
        BuiltinRestoration(builtin_root, "val", tasks=[RAINDROP])
    yy, xx = np.mgrid[:48, :48].astype(np.float32)
    clean = np.stack([yy / 47, xx / 47, np.full_like(yy, 0.5)], 2)  # a vertical ramp: upside down inside a drop
    out, p = _raindrops(clean, np.random.default_rng(4))
    again, p2 = _raindrops(clean, np.random.default_rng(4))
    assert np.array_equal(out, again) and p == p2 and 2 <= len(p["drops"]) <= 6
    changed = np.abs(out - clean).max(2) > 1 / 255  # a grey level: what survives the crops' 8 bits
    inside = np.zeros((48, 48), bool)
    for cx, cy, rx, ry in p["drops"]:
        inside |= ((xx - cx) / (rx + 3)) ** 2 + ((yy - cy) / (ry + 3)) ** 2 <= 1
    assert changed.any() and not (changed & ~inside).any()  # only where a drop sits
    cx, cy, rx, ry = p["drops"][0]
    col = int(np.clip(round(cx), 0, 47))
    top, bottom = int(np.clip(cy - ry / 2, 0, 47)), int(np.clip(cy + ry / 2, 0, 47))
    if bottom - top >= 3:  # the red channel (the vertical ramp) falls from the drop's top to its bottom
        assert out[top, col, 0] > out[bottom, col, 0]
    base = {"model": {"backbone": "demoe_deweather_tiny"}, "tasks": {"derain": {}}}
    with pytest.raises(ConfigError, match="data.datasets\\[0\\].raindrops: is an option of the builtin_restore"):
        config_from_dict(dict(base, data={"datasets": [{"format": "paired", "root": "x", "raindrops": True}]}))
