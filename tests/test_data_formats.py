"""Loaders for ADE20K/VOC folders, ImageNet folders, PASCAL-Context and NYUD-v2 multi-task layouts."""

import io
import zlib

import numpy as np
import pytest
import torch
from fixtures_data import write_ade20k, write_imagenet_folders, write_nyud, write_pascal_context
from PIL import Image

from vision_moe.data import BadSampleError, SkipBadSamples, build_transforms, collate_multitask, stack_target
from vision_moe.data.classification import ImageFolderClassification
from vision_moe.data.multitask import NYUDv2MT, PascalContextMT
from vision_moe.data.segmentation import SegmentationFolder, ade20k, voc_segmentation


def test_ade20k_reduce_zero_label(tmp_path):
    write_ade20k(tmp_path)
    ds = ade20k(tmp_path, "training")
    assert len(ds) == 3 and ds.num_classes == {"semseg": 150} and ds.tasks == ("semseg",)
    raw_png = np.array(Image.open(ds.samples[0][1])).astype(np.int64)
    _, t = ds[0]
    expected = np.where(raw_png == 0, 255, raw_png - 1)
    np.testing.assert_array_equal(t["semseg"].numpy(), expected)
    plain = SegmentationFolder(tmp_path, "training", num_classes=5, reduce_zero_label=False)
    np.testing.assert_array_equal(plain[0][1]["semseg"].numpy(), raw_png)
    with pytest.raises(ValueError, match="unknown split"):
        ade20k(tmp_path, "test")
    with pytest.raises(ValueError, match="split folder not found"):
        SegmentationFolder(tmp_path, "val")


def test_segmentation_bad_label_and_missing_annotation(tmp_path):
    write_ade20k(tmp_path)
    ds = SegmentationFolder(tmp_path, "training", num_classes=3, reduce_zero_label=False)
    with pytest.raises(BadSampleError, match="outside 0..2"):
        [ds[i] for i in range(len(ds))]
    # truncated label PNG
    p = ds.samples[1][1]
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(BadSampleError, match="cannot decode PNG"):
        ade20k(tmp_path)[1]
    p.unlink()
    with pytest.raises(ValueError, match="annotation not found"):
        ade20k(tmp_path)


def test_voc_layout(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "SegmentationClass").mkdir()
    (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "JPEGImages" / "2007_000032.jpg")
    lab = Image.fromarray(np.array([[0, 1, 255, 20]] * 8, np.uint8).repeat(2, 1), mode="L").convert("P")
    lab.save(tmp_path / "SegmentationClass" / "2007_000032.png")  # palette PNG as VOC ships them
    (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n")
    ds = voc_segmentation(tmp_path, "train")
    _, t = ds[0]
    assert ds.num_classes == {"semseg": 21}
    assert t["semseg"][0].tolist() == [0, 0, 1, 1, 255, 255, 20, 20]


def test_imagenet_folders(tmp_path):
    root = write_imagenet_folders(tmp_path)
    (root / "n01440764" / "notes.txt").write_text("not an image")  # ignored like torchvision does
    tf = build_transforms(True, 16, tasks=("classification",))
    ds = ImageFolderClassification(tmp_path, "train", transform=tf)
    assert ds.classes == ["n01440764", "n01443537", "n01484850"] and len(ds) == 6
    assert ds.num_classes == {"classification": 3}
    images, targets = collate_multitask([ds[i] for i in range(len(ds))])
    assert images.shape == (6, 3, 16, 16)
    assert stack_target(targets, "class_label").tolist() == [0, 0, 1, 1, 2, 2]
    ds.samples[2] = (ds.samples[2][0], 1)
    open(ds.samples[2][0], "wb").write(b"\x89PNG\r\n\x1a\n garbage")
    skip = SkipBadSamples(ds)
    assert skip[2] is None and skip.bad_count == 1 and "JPEG" in skip.bad_samples[0][1]


def test_pascal_context_multitask(tmp_path):
    write_pascal_context(tmp_path)
    ds = PascalContextMT(tmp_path, "train")
    assert ds.tasks == ("semseg", "human_parts", "saliency", "normals", "edges")
    assert ds.num_classes == {"semseg": 21, "human_parts": 7}
    img, t = ds[0]
    assert img.shape == (3, 16, 20)
    assert t["semseg"][0, 2].item() == 15 and t["semseg"][-1, 0].item() == 255
    hp = t["human_parts"]
    assert hp[1, 3].item() == 1 and hp[5, 3].item() == 2 and hp[9, 3].item() == 3 and hp[12, 10].item() == 0
    assert t["saliency"].shape == (1, 16, 20) and t["saliency"][0, 0, 2] == 1 and t["saliency"][0, 12, 12] == 0
    n = t["normals"]
    torch.testing.assert_close(n[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=0.01, rtol=0)
    torch.testing.assert_close(n[:, 0, 15], torch.tensor([0.0, 0.0, 1.0]), atol=0.01, rtol=0)
    e = t["edges"][0]
    assert e.sum() > 0 and e[:, 10:].sum() == 0  # boundaries only around the person region
    _, t2 = ds[1]  # no person in image 2: human parts all ignore
    assert (t2["human_parts"] == 255).all()
    # normals masked to the valid LabelMap classes
    masked = PascalContextMT(tmp_path, "train", tasks=("normals",), normals_valid_classes=[284])
    _, tm = masked[0]
    assert (tm["normals"][:, 12, 12] == 0).all() and tm["normals"][:, 5, 3].norm() > 0.99
    flipped = PascalContextMT(tmp_path, "train", transform=build_transforms(True, 16, scale=(1, 1), hflip=1.0))
    _, tf = flipped[0]
    assert tf["normals"][0].min() < -0.9  # the 'pointing right' half now points left
    with pytest.raises(ValueError, match="split list not found"):
        PascalContextMT(tmp_path, "val")


def test_pascal_context_bad_mat(tmp_path):
    write_pascal_context(tmp_path)
    (tmp_path / "human_parts" / "2008_000002.mat").write_bytes(b"MATLAB 5.0 broken")
    with pytest.raises(BadSampleError, match="2008_000002.mat"):
        PascalContextMT(tmp_path, "train", tasks=("human_parts",))[0]


def test_nyud_multitask(tmp_path):
    write_nyud(tmp_path)
    ds = NYUDv2MT(tmp_path, "val")
    assert ds.tasks == ("semseg", "depth", "normals", "edges") and ds.num_classes == {"semseg": 40}
    img, t = ds[0]
    assert img.shape == (3, 12, 16)
    assert t["semseg"][0, 0] == 255 and t["semseg"][1, 0] == 4 and t["semseg"][6, 0] == 39
    assert t["depth"].shape == (1, 12, 16) and t["depth"][0, 0, 0] == pytest.approx(0.5)
    assert (t["normals"][1] == -1).all() and t["edges"][0, 5].sum() == 16
    only_depth = NYUDv2MT(tmp_path, "val", tasks=("depth",))
    assert set(only_depth[1][1]) == {"image_id", "depth"} and only_depth.num_classes == {}
    (tmp_path / "depth" / "0002.npy").unlink()
    with pytest.raises(BadSampleError, match="file not found"):
        ds[1]


def _npz_bytes() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, a=np.zeros((12, 16), np.float32))
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@pytest.mark.parametrize(
    "folder, content, expected",
    [
        ("depth", b"", r"cannot read \.npy \(No data left in file\)"),  # EOFError from numpy
        ("depth", "truncated", r"cannot read \.npy \(Failed to read all data"),
        ("edge", "header_only", r"cannot read \.npy \(EOF: reading array header"),
        ("depth", _npz_bytes(), r"is an \.npz archive; expected a single array"),
        ("depth", _npy_bytes(np.full((12, 16), "x")), r"dtype <U1; expected a real numeric array"),
        ("depth", _npy_bytes(np.zeros((12, 16, 2), np.float32)), r"shape \(12, 16, 2\); expected a single-channel map"),
        ("edge", _npy_bytes(np.zeros((12, 16, 3), np.float32)), r"shape \(12, 16, 3\); expected a single-channel map"),
    ],
    ids=["empty", "truncated", "header_only", "npz", "strings", "two_channel_depth", "three_channel_edges"],
)
def test_nyud_corrupt_npy_is_a_bad_sample_naming_the_file(tmp_path, folder, content, expected):
    write_nyud(tmp_path)
    path = tmp_path / folder / "0001.npy"
    good = path.read_bytes()
    content = {"truncated": good[: len(good) - 100], "header_only": good[:60]}.get(content, content)
    path.write_bytes(content)
    ds = NYUDv2MT(tmp_path, "val")
    with pytest.raises(BadSampleError, match=expected) as e:
        ds[0]
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    skip = SkipBadSamples(ds)  # training goes on: the sample is counted, the next one loads
    images, targets = collate_multitask([skip[0], skip[1]])
    assert skip.bad_count == 1 and images.shape[0] == 1 and targets[0]["image_id"] == 1


def test_corrupt_mat_and_png_are_bad_samples(tmp_path):
    write_pascal_context(tmp_path)
    mat = tmp_path / "pascal-context" / "trainval" / "2008_000002.mat"
    mat.write_bytes(mat.read_bytes()[:100])  # scipy raises IndexError on a .mat cut inside its 128-byte header
    with pytest.raises(BadSampleError, match=r"2008_000002\.mat: cannot read \.mat file"):
        PascalContextMT(tmp_path, "train", tasks=("edges",))[0]
    png = tmp_path / "sal_distill" / "2008_000002.png"
    data = bytearray(png.read_bytes())  # a header claiming a 10^5 x 10^5 image: PIL's DecompressionBombError
    data[16:24] = (100_000).to_bytes(4, "big") * 2
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    png.write_bytes(bytes(data))
    with pytest.raises(BadSampleError, match=r"2008_000002\.png: cannot decode PNG \(Image size"):
        PascalContextMT(tmp_path, "train", tasks=("saliency",))[0]
