"""COCO detection JSON loader: crowd regions, empty images, degenerate boxes, contiguous labels, bad input."""

import json

import numpy as np
import pytest
import torch
from fixtures_data import write_coco
from PIL import Image

from vision_moe.data import BadSampleError, CocoDetection, SkipBadSamples, build_transforms, collate_multitask


def test_coco_loader_reads_real_json(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = CocoDetection(img_dir.parent, "train2017")
    assert len(ds) == 4  # the image without boxes is kept
    assert ds.num_dropped_boxes == 1  # zero-width box
    assert ds.num_crowd == 1
    assert ds.contiguous_to_cat_id == [3, 7, 11]
    assert ds.num_classes == {"detection": 3}
    assert ds.tasks == ("detection",)
    img, tgt = ds[0]
    assert img.shape == (3, 40, 60) and img.dtype == torch.float32
    # normalised with mean = std = 0.5 by default: (byte / 255 - 0.5) / 0.5 of the decoded JPEG, channels first
    raw = np.asarray(Image.open(img_dir / ds.coco.imgs[1]["file_name"]).convert("RGB"), dtype=np.float32)
    torch.testing.assert_close(img, torch.from_numpy(raw / 127.5 - 1.0).permute(2, 0, 1), atol=1e-6, rtol=0)
    # crowd box (category 7) is left out; xywh -> xyxy; labels contiguous
    torch.testing.assert_close(tgt["boxes"], torch.tensor([[2.0, 3, 12, 15], [20, 5, 50, 25]]))
    assert tgt["labels"].tolist() == [0, 2]
    assert tgt["image_id"] == 1
    _, tgt2 = ds[1]
    torch.testing.assert_close(tgt2["boxes"], torch.tensor([[5.5, 6.5, 15.5, 26.5]]))
    assert tgt2["labels"].tolist() == [1]
    _, tgt3 = ds[2]
    assert tgt3["boxes"].shape == (0, 4) and tgt3["labels"].shape == (0,)
    # the pycocotools index is what COCOeval will use: crowd kept there, degenerate box gone
    assert set(ds.coco.anns) == {1, 2, 3, 5, 6}


def test_coco_with_train_transform_keeps_boxes_inside(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = CocoDetection(img_dir.parent, "train2017", transform=build_transforms(True, 32, tasks=("detection",), seed=0))
    images, targets = collate_multitask([ds[i] for i in range(len(ds))])
    assert images.shape == (4, 3, 32, 32)
    for t in targets:
        b = t["boxes"]
        assert b.shape[1] == 4 and len(b) == len(t["labels"])
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b >= 0).all() and (b <= 32).all()


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d.pop("annotations"), "missing top-level key 'annotations'"),
        (lambda d: d["annotations"][0].pop("bbox"), "missing key 'bbox'"),
        (lambda d: d["annotations"][1].__setitem__("bbox", [1, 2, 3]), "expected 4 numbers"),
        (lambda d: d["annotations"][1].__setitem__("category_id", 99), "not in 'categories'"),
        (lambda d: d["images"][0].pop("file_name"), "missing key 'file_name'"),
        (lambda d: d["images"][3].__setitem__("id", [1]), r"images\[3\]\.id: expected an integer, got \[1\]"),
        (lambda d: d["images"][1].__setitem__("id", "2"), r"images\[1\]\.id: expected an integer, got '2'"),
        (
            lambda d: d["images"][1].__setitem__("file_name", ["a.jpg"]),
            r"file_name = \['a.jpg'\]; expected a non-empty",
        ),
        (
            lambda d: d["images"][2].__setitem__("id", 1),
            r"images\[2\]\.id = 1 repeats images\[0\]\.id; expected unique",
        ),
        (lambda d: d["categories"][1].__setitem__("id", {"x": 1}), r"categories\[1\]\.id: expected an integer"),
        (lambda d: d["categories"][2].__setitem__("id", 3), r"categories\[2\]\.id = 3 repeats categories\[0\]"),
        (lambda d: d.__setitem__("categories", []), r"'categories' is empty; expected at least one category"),
        (
            lambda d: d["annotations"][4].__setitem__("image_id", [2]),
            r"annotations\[4\]\.image_id: expected an integer",
        ),
        (
            lambda d: d["annotations"][0].__setitem__("category_id", 3.0),
            r"\.category_id: expected an integer, got 3\.0",
        ),
        (lambda d: d["annotations"][5].__setitem__("id", None), r"annotations\[5\]\.id: expected an integer, got None"),
        (lambda d: d["annotations"][1].__setitem__("bbox", [1, 2, True, 4]), "expected 4 numbers"),
    ],
    ids=[
        "no_annotations",
        "no_bbox",
        "bbox_3_numbers",
        "unknown_category",
        "no_file_name",
        "image_id_list",
        "image_id_str",
        "file_name_list",
        "duplicate_image_id",
        "category_id_dict",
        "duplicate_category_id",
        "no_categories",
        "ann_image_id_list",
        "ann_category_id_float",
        "ann_id_null",
        "bbox_bool",
    ],
)
def test_malformed_coco_json_is_one_line_error(tmp_path, mutate, expected):
    img_dir, ann = write_coco(tmp_path)
    data = json.loads(ann.read_text())
    mutate(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=expected) as e:
        CocoDetection(img_dir.parent, "train2017")
    msg = str(e.value)
    assert "\n" not in msg and str(ann) in msg


def test_not_json(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ann.write_text('{"images": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDetection(img_dir.parent, "train2017")


def test_binary_annotation_file_is_one_line_error_naming_it(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    other = tmp_path / "binary.json"
    other.write_bytes(b"\x89\xf3\x00\xff binary, not UTF-8 \xc3\x28")
    with pytest.raises(ValueError) as e:
        CocoDetection(img_dir.parent, "train2017", ann_file=other)
    assert (
        str(e.value)
        == f"{other}: malformed COCO JSON: not UTF-8 text (byte 0x89 at offset 0); expected a JSON text file"
    )
    ann.write_bytes(json.dumps(json.loads(ann.read_text())).encode("utf-16"))  # BOM-marked UTF-16 is still JSON
    assert len(CocoDetection(img_dir.parent, "train2017")) == 4


@pytest.mark.parametrize(
    "bad",
    [[1, 2, float("nan"), 4], [float("inf"), 2, 3, 4], [1, 2, 3, -float("inf")], [1, 2, 10**400, 4]],
    ids=["nan_width", "inf_x", "minus_inf_height", "int_beyond_float"],
)
def test_non_finite_boxes_are_dropped_and_counted_like_empty_ones(tmp_path, caplog, bad):
    img_dir, ann = write_coco(tmp_path)
    data = json.loads(ann.read_text())
    data["annotations"][1]["bbox"] = bad  # image 1's second box (category 11)
    ann.write_text(json.dumps(data))  # Python writes NaN / Infinity, which json.loads reads back
    with caplog.at_level("WARNING", logger="vision_moe.data.coco"):
        ds = CocoDetection(img_dir.parent, "train2017")
    assert ds.num_dropped_boxes == 2  # this one and the fixture's zero-width box
    assert f"{ann}: dropped 2 boxes with non-positive width or height or a NaN / inf value" in caplog.text
    assert 2 not in ds.coco.anns
    _, tgt = ds[0]
    assert tgt["labels"].tolist() == [0] and torch.isfinite(tgt["boxes"]).all()


def test_corrupt_and_truncated_images_raise_bad_sample_and_are_skipped(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = CocoDetection(img_dir.parent, "train2017")
    (img_dir / ds.coco.imgs[2]["file_name"]).write_bytes(b"this is not a jpeg")
    p4 = img_dir / ds.coco.imgs[4]["file_name"]
    p4.write_bytes(p4.read_bytes()[: len(p4.read_bytes()) // 2])  # truncated
    with pytest.raises(BadSampleError) as e:
        ds[1]
    assert ds.coco.imgs[2]["file_name"] in str(e.value)
    with pytest.raises(BadSampleError, match="cannot decode"):
        ds[3]
    skip = SkipBadSamples(ds)
    batch = [skip[i] for i in range(len(skip))]
    assert batch[1] is None and batch[3] is None
    assert skip.bad_count == 2 and [i for i, _ in skip.bad_samples] == [1, 3]
    assert skip.bad_fraction == pytest.approx(0.5)
    images, targets = collate_multitask(batch)
    assert images.shape[0] == 2 and [t["image_id"] for t in targets] == [1, 3]
    assert skip.num_classes == {"detection": 3}  # attributes pass through the wrapper


def test_missing_image_file(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    ds = CocoDetection(img_dir.parent, "train2017")
    (img_dir / ds.coco.imgs[1]["file_name"]).unlink()
    with pytest.raises(BadSampleError, match="file not found"):
        ds[0]


def test_unknown_task(tmp_path):
    img_dir, ann = write_coco(tmp_path)
    with pytest.raises(ValueError, match="unknown task 'semseg'"):
        CocoDetection(img_dir.parent, "train2017", tasks=("semseg",))
    assert np.isfinite(CocoDetection(img_dir.parent, "train2017")[0][0].numpy()).all()
