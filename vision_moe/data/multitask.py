"""Multi-task layouts used by ASTMT / MTI-Net / ATRC / M³ViT: PASCAL-Context (PASCAL_MT) and NYUD-v2 (NYUD_MT).

PASCAL-Context (``root`` = the PASCALContext folder)::

    JPEGImages/<id>.jpg
    semseg/VOC12/<id>.png or semseg/pascal-context/<id>.png    21 classes, 255 = ignore
    human_parts/<id>.mat        Pascal-Part ``anno`` struct (objects: class, class_ind, mask, parts(part_name, mask))
    sal_distill/<id>.png        saliency, thresholded at half range
    normals_distill/<id>.png    RGB, n = 2 * v / 255 - 1
    pascal-context/trainval/<id>.mat   ``LabelMap`` (459 classes): edges are its label boundaries (thinned)
    ImageSets/Context/<split>.txt

NYUD-v2 (``root`` = the NYUD_MT folder)::

    images/<id>.jpg|png   segmentation/<id>.png (0 = void -> 255, 1..40 -> 0..39)
    depth/<id>.npy|png (metres; 16-bit PNG in mm)   normals/<id>.npy|png   edge/<id>.npy|png
    gt_sets/<split>.txt
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import scipy.io
import torch
from skimage.morphology import thin

from .common import (
    IGNORE_INDEX,
    BadSampleError,
    _reason,
    check_tasks,
    decode_normals_png,
    finalize_sample,
    read_binary_png,
    read_depth_png,
    read_image,
    read_label_png,
    read_normals_png,
    read_npy,
    read_png,
)

PASCAL_TASKS = ("semseg", "human_parts", "saliency", "normals", "edges")
NYUD_TASKS = ("semseg", "depth", "normals", "edges")
PERSON_CLASS = 15  # VOC index of 'person' in Pascal-Part

# Pascal-Part person parts grouped into 6 parts (head, torso, upper arms, lower arms, upper legs, lower legs)
HUMAN_PARTS_6 = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}


def _read_split(path: Path) -> list[str]:
    if not path.exists():
        raise ValueError(f"{path}: split list not found")
    ids = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    if not ids:
        raise ValueError(f"{path}: split list is empty")
    return ids


def _loadmat(path: Path, key: str) -> Any:
    try:
        return scipy.io.loadmat(path)[key]
    except FileNotFoundError:
        raise BadSampleError(path, "file not found") from None
    except KeyError:
        raise BadSampleError(path, f"no variable {key!r} in .mat file") from None
    except Exception as e:  # a corrupt .mat raises IndexError, UnboundLocalError, MemoryError, ...: all bad samples
        raise BadSampleError(path, f"cannot read .mat file ({_reason(e)})") from None


def _single_channel(path: Path, arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) or (H, W, 1) -> (H, W); any other shape is a bad sample."""
    if arr.shape not in (tuple(hw), (*hw, 1)):
        raise BadSampleError(path, f"shape {arr.shape}; expected a single-channel map {tuple(hw)}")
    return arr.reshape(hw)


def label_boundaries(label_map: np.ndarray) -> np.ndarray:
    """Thin binary boundaries of a label map (Laplacian non-zero, then morphological thinning)."""
    lap = cv2.Laplacian(label_map.astype(np.float64), cv2.CV_64F)
    return thin(np.abs(lap) > 0).astype(np.float32)


def read_pascal_parts(path: Path, hw: tuple[int, int], part_map: dict[str, int] = HUMAN_PARTS_6) -> np.ndarray:
    """Human-part labels (H, W) from a Pascal-Part .mat; images without a person with parts are all ignore."""
    anno = _loadmat(path, "anno")
    try:
        objects = anno[0, 0]["objects"].reshape(-1)
        out = np.zeros(hw, np.int64)
        found = False
        for obj in objects:
            if int(np.asarray(obj["class_ind"]).reshape(-1)[0]) != PERSON_CLASS or obj["parts"].size == 0:
                continue
            found = True
            for part in obj["parts"].reshape(-1):
                name = str(np.asarray(part["part_name"]).reshape(-1)[0])
                if name not in part_map:
                    raise BadSampleError(path, f"unknown part name {name!r}; expected one of {sorted(part_map)}")
                mask = np.asarray(part["mask"]).astype(bool)
                if mask.shape != hw:
                    raise BadSampleError(path, f"part mask size {mask.shape} does not match image size {hw}")
                out[mask] = part_map[name]
    except BadSampleError:
        raise
    except Exception as e:  # a struct of another shape: KeyError, ValueError, IndexError, TypeError, ...
        raise BadSampleError(path, f"not a Pascal-Part 'anno' struct ({_reason(e)})") from None
    return out if found else np.full(hw, IGNORE_INDEX, np.int64)


class PascalContextMT(torch.utils.data.Dataset):
    """PASCAL-Context multi-task (semseg 21, human_parts 7, saliency, normals, edges), ASTMT layout."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Any = None,
        normals_valid_classes: Sequence[int] | None = None,
    ):
        self.root = Path(root)
        self.split = split
        self.tasks = check_tasks(tasks, PASCAL_TASKS, type(self).__name__)
        self.transform = transform
        self.normals_valid_classes = None if normals_valid_classes is None else np.asarray(normals_valid_classes)
        self.ids = _read_split(self.root / "ImageSets" / "Context" / f"{split}.txt")
        all_classes = {"semseg": 21, "human_parts": len(set(HUMAN_PARTS_6.values())) + 1}
        self.num_classes = {t: k for t, k in all_classes.items() if t in self.tasks}

    def __len__(self) -> int:
        return len(self.ids)

    def _semseg_path(self, i: str) -> Path:
        voc = self.root / "semseg" / "VOC12" / f"{i}.png"
        return voc if voc.exists() else self.root / "semseg" / "pascal-context" / f"{i}.png"

    def load_raw(self, index: int) -> dict[str, Any]:
        i, r = self.ids[index], self.root
        image = read_image(r / "JPEGImages" / f"{i}.jpg")
        hw = image.shape[:2]
        raw: dict[str, Any] = {"image": image, "image_id": index}
        if "semseg" in self.tasks:
            raw["semseg"] = read_label_png(self._semseg_path(i), hw)
        if "human_parts" in self.tasks:
            raw["human_parts"] = read_pascal_parts(r / "human_parts" / f"{i}.mat", hw)
        if "saliency" in self.tasks:
            raw["saliency"] = read_binary_png(r / "sal_distill" / f"{i}.png", hw)
        label_map = None
        if "edges" in self.tasks or ("normals" in self.tasks and self.normals_valid_classes is not None):
            mat = r / "pascal-context" / "trainval" / f"{i}.mat"
            label_map = np.asarray(_loadmat(mat, "LabelMap"))
            if label_map.shape != hw:
                raise BadSampleError(mat, f"LabelMap size {label_map.shape} does not match image size {hw}")
        if "edges" in self.tasks:
            raw["edges"] = label_boundaries(label_map)
        if "normals" in self.tasks:
            n = read_normals_png(r / "normals_distill" / f"{i}.png", hw)
            if self.normals_valid_classes is not None:  # distilled normals are trusted only on some classes
                n[~np.isin(label_map, self.normals_valid_classes)] = 0.0
            raw["normals"] = n
        return raw

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return finalize_sample(self.load_raw(index), self.transform, self.tasks)


class NYUDv2MT(torch.utils.data.Dataset):
    """NYUD-v2 multi-task (semseg 40, depth, normals, edges), ATRC/InvPT ``NYUD_MT`` layout."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        tasks: Sequence[str] | None = None,
        transform: Any = None,
    ):
        self.root = Path(root)
        self.split = split
        self.tasks = check_tasks(tasks, NYUD_TASKS, type(self).__name__)
        self.transform = transform
        self.ids = _read_split(self.root / "gt_sets" / f"{split}.txt")
        self.num_classes = {"semseg": 40} if "semseg" in self.tasks else {}

    def __len__(self) -> int:
        return len(self.ids)

    def _find(self, folder: str, i: str, suffixes: Sequence[str]) -> Path:
        for s in suffixes:
            p = self.root / folder / f"{i}{s}"
            if p.exists():
                return p
        raise BadSampleError(self.root / folder / f"{i}{suffixes[0]}", f"file not found (tried {list(suffixes)})")

    def load_raw(self, index: int) -> dict[str, Any]:
        i = self.ids[index]
        image = read_image(self._find("images", i, (".jpg", ".png")))
        hw = image.shape[:2]
        raw: dict[str, Any] = {"image": image, "image_id": index}
        if "semseg" in self.tasks:
            lab = read_label_png(self._find("segmentation", i, (".png",)), hw)
            raw["semseg"] = np.where(lab == 0, IGNORE_INDEX, lab - 1)  # 0 = void
        if "depth" in self.tasks:
            p = self._find("depth", i, (".npy", ".png"))
            d = read_npy(p, hw) if p.suffix == ".npy" else read_depth_png(p, hw)
            raw["depth"] = _single_channel(p, d, hw).astype(np.float32)
        if "normals" in self.tasks:
            p = self._find("normals", i, (".npy", ".png"))
            if p.suffix == ".npy":
                n = read_npy(p, hw).astype(np.float32)
                if n.shape != (*hw, 3):
                    raise BadSampleError(p, f"normals shape {n.shape}; expected (H, W, 3)")
            else:
                n = decode_normals_png(read_png(p, hw, mode="RGB"))
            raw["normals"] = n
        if "edges" in self.tasks:
            p = self._find("edge", i, (".npy", ".png"))
            e = read_npy(p, hw) if p.suffix == ".npy" else read_png(p, hw, mode="L") / 255.0
            raw["edges"] = (_single_channel(p, e, hw) > 0.5).astype(np.float32)
        return raw

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        return finalize_sample(self.load_raw(index), self.transform, self.tasks)


# the names the engine's dataset config uses
PascalContext = PascalContextMT
NYUDv2 = NYUDv2MT
