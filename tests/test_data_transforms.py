"""albumentations pipelines: image, boxes and masks move together; flip negates normals' x."""

import numpy as np
import pytest
import torch

from vision_moe.data.transforms import build_transforms


def _raw(h=40, w=60):
    rng = np.random.default_rng(0)
    sem = np.zeros((h, w), np.int64)
    sem[10:20, 5:15] = 3  # object on the left
    normals = np.zeros((h, w, 3), np.float32)
    normals[..., 0] = 0.6
    normals[..., 2] = 0.8
    return {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "image_id": 7,
        "class_label": 2,
        "boxes": np.array([[5, 10, 15, 20]], np.float32),
        "labels": np.array([1]),
        "semseg": sem,
        "saliency": (sem > 0).astype(np.float32),
        "edges": np.zeros((h, w), np.float32),
        "depth": np.full((h, w), 2.5, np.float32),
        "normals": normals,
    }


def test_eval_resize_pad_keeps_alignment():
    tf = build_transforms(False, 32, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    img, t = tf(_raw())
    assert img.shape == (3, 32, 32)
    sx, sy = 32 / 60, 21 / 40  # longest side to 32; 40 * 32 / 60 = 21.3 rows
    torch.testing.assert_close(t["boxes"], torch.tensor([[5 * sx, 10 * sy, 15 * sx, 20 * sy]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(t["scale"], torch.tensor([sx, sy]))
    assert t["orig_size"].tolist() == [40, 60]
    rows = 21
    assert (t["semseg"][rows:] == 255).all()  # padding is ignore for label maps
    assert (t["depth"][0, rows:] == 0).all() and (t["normals"][:, rows:] == 0).all()
    # box and mask still cover the same pixels
    b = t["boxes"][0].round().long()
    assert (t["semseg"][b[1] : b[3], b[0] : b[2]] == 3).float().mean() > 0.75  # nearest resampling at 21 px
    assert t["class_label"].item() == 2 and t["image_id"] == 7


def test_normalize_uses_mean_std():
    raw = _raw()
    raw["image"][:] = 255
    img, _ = build_transforms(False, None, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))(raw)
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_flip_negates_normals_x_and_moves_everything():
    tf = build_transforms(True, 40, scale=(1.0, 1.0), hflip=1.0, color_jitter=0.0, seed=0)
    raw = _raw(40, 40)
    img, t = tf(raw)
    assert (t["normals"][0] < 0).all() and torch.allclose(t["normals"][2], torch.tensor(0.8))
    # object moved to the right side; the box followed
    cols = torch.nonzero(t["semseg"] == 3)[:, 1]
    assert cols.min() >= 24
    b = t["boxes"][0]
    assert b[0] == pytest.approx(25, abs=1) and b[2] == pytest.approx(35, abs=1)
    tf_no = build_transforms(True, 40, scale=(1.0, 1.0), hflip=0.0, color_jitter=0.0, seed=0)
    _, t2 = tf_no(raw)
    assert (t2["normals"][0] > 0).all()


def test_random_crop_consistent_and_seeded():
    tf_a = build_transforms(True, 24, seed=5)
    tf_b = build_transforms(True, 24, seed=5)
    raw = _raw()
    for _ in range(5):
        ia, ta = tf_a(raw)
        ib, tb = tf_b(raw)
        torch.testing.assert_close(ia, ib)
        assert ia.shape == (3, 24, 24) and ta["semseg"].shape == (24, 24)
        assert ta["normals"].shape == (3, 24, 24) and ta["saliency"].shape == (1, 24, 24)
        # saliency and semseg still agree pixel for pixel after crop/resize (nearest)
        assert torch.equal(ta["saliency"][0] > 0, ta["semseg"] == 3)
        n = ta["normals"].norm(dim=0)
        assert torch.allclose(n, torch.ones_like(n), atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'segmentation'"):
        build_transforms(False, 32, tasks=("segmentation",))
    with pytest.raises(ValueError, match="needs an img_size"):
        build_transforms(True, None)
