#!/usr/bin/env python
"""Write small synthetic COCO and ADE20K datasets in the libraries' exact on-disk layouts.

The output mirrors the ``data/`` tree that mmdet's and mmseg's base configs point at, so
``--out data`` makes the configs in ``mm_configs/`` find it without touching ``data_root``::

    OUT/coco/annotations/instances_train2017.json     COCO instances json (boxes + polygon masks)
    OUT/coco/annotations/instances_val2017.json
    OUT/coco/train2017/000000000001.jpg ...
    OUT/coco/val2017/...
    OUT/ade/ADEChallengeData2016/images/training/ADE_train_00000001.jpg ...
    OUT/ade/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg ...
    OUT/ade/ADEChallengeData2016/annotations/training/ADE_train_00000001.png   uint8 label maps
    OUT/ade/ADEChallengeData2016/annotations/validation/...

Images show non-overlapping filled shapes (square, disk, triangle) on a noisy background; every
shape type has its own colour, so a detector or segmenter can actually learn them.

COCO: the json lists COCO's 80 categories (ids and names, as the real files do) and the shapes use
the first three (1 'person' = square, 2 'bicycle' = disk, 3 'car' = triangle; the shape is in
``supercategory``), so mmdet's ``CocoDataset`` and ``CocoMetric`` with their default 80 classes
read and evaluate them unchanged. Every instance is one polygon; the mask drawn into the image
is that same polygon, so box, polygon and pixels agree.

ADE20K: label maps use ADE20K's raw convention, 0 = "other/unlabelled" (a 4-pixel border here) and
1..150 = classes, which mmseg's ``ADE20KDataset`` turns into 255 = ignore and 0..149 via
``reduce_zero_label=True``. Background is class 1 ('wall'), squares 3 ('sky'), disks 5 ('tree'),
triangles 13 ('person').

Usage::

    python tools/make_synthetic_mm_data.py --out data                  # both datasets
    python tools/make_synthetic_mm_data.py --out /tmp/d --only coco --num-train 8 --num-val 4 --size 128
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "disk", "triangle")
# COCO 2017's 80 detection categories as (id, name), ids with COCO's gaps. The json lists them all,
# like the real instances files, so that a detector's 80 class indices map to category ids.
COCO_CATEGORIES = tuple(zip(
    (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
     32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57,
     58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87,
     88, 89, 90),
    ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
     "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
     "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
     "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
     "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
     "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
     "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
     "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
     "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
     "teddy bear", "hair drier", "toothbrush"),
))
assert len(COCO_CATEGORIES) == 80
# (COCO category id, COCO name) per shape: the first three COCO categories.
COCO_CATEGORY_OF_SHAPE = {"square": (1, "person"), "disk": (2, "bicycle"), "triangle": (3, "car")}
# Raw ADE20K label ids (1-based, before reduce_zero_label) per shape, and for the background.
ADE_LABEL_OF_SHAPE = {"square": 3, "disk": 5, "triangle": 13}
ADE_BACKGROUND_LABEL = 1
ADE_UNLABELLED = 0
ADE_UNLABELLED_BORDER = 4
SHAPE_COLOUR = {"square": (220, 40, 40), "disk": (40, 200, 60), "triangle": (50, 80, 230)}

Polygon = List[Tuple[float, float]]


def shape_polygon(shape: str, center: Tuple[float, float], radius: float) -> Polygon:
    """Vertices (x, y) in pixels of a shape centred at ``center`` with circumradius ``radius``."""
    cx, cy = center
    if shape == "square":
        half = radius / math.sqrt(2.0)
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "disk":
        steps = 24
        return [(cx + radius * math.cos(2 * math.pi * k / steps), cy + radius * math.sin(2 * math.pi * k / steps))
                for k in range(steps)]
    if shape == "triangle":
        return [(cx + radius * math.cos(-math.pi / 2 + 2 * math.pi * k / 3),
                 cy + radius * math.sin(-math.pi / 2 + 2 * math.pi * k / 3)) for k in range(3)]
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def polygon_area(polygon: Polygon) -> float:
    """Shoelace area of a simple polygon in pixels^2."""
    xs = np.array([p[0] for p in polygon])
    ys = np.array([p[1] for p in polygon])
    return float(0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))))


def random_scene(rng: np.random.Generator, size: int, max_shapes: int = 3) -> List[Tuple[str, Polygon]]:
    """1..max_shapes non-overlapping shapes, one per cell of a 2x2 grid (so masks never overlap)."""
    cell = size / 2.0
    cells = rng.permutation(4)[: rng.integers(1, max_shapes + 1)]
    scene = []
    for cell_index in cells:
        row, col = divmod(int(cell_index), 2)
        radius = rng.uniform(0.25, 0.42) * cell
        margin = radius + 1.0
        cx = col * cell + rng.uniform(margin, cell - margin)
        cy = row * cell + rng.uniform(margin, cell - margin)
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        scene.append((shape, shape_polygon(shape, (cx, cy), radius)))
    return scene


def render(rng: np.random.Generator, size: int, scene: Sequence[Tuple[str, Polygon]]) -> Image.Image:
    """RGB image: noisy grey background, each shape filled with its colour (plus mild noise)."""
    background = rng.normal(128.0, 20.0, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)
    for shape, polygon in scene:
        jitter = rng.integers(-20, 21, size=3)
        colour = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(SHAPE_COLOUR[shape], jitter))
        draw.polygon(polygon, fill=colour)
    return image


def write_coco_split(root: Path, split: str, num_images: int, size: int, rng: np.random.Generator,
                     first_image_id: int, first_annotation_id: int) -> Tuple[int, int]:
    """Writes ``root/{split}2017/*.jpg`` and ``root/annotations/instances_{split}2017.json``.

    Returns the next free image id and annotation id (ids stay unique across splits, as in COCO).
    """
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    image_id, annotation_id = first_image_id, first_annotation_id
    for _ in range(num_images):
        scene = random_scene(rng, size)
        file_name = f"{image_id:012d}.jpg"
        render(rng, size, scene).save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                       "license": 1, "date_captured": "2024-01-01 00:00:00"})
        for shape, polygon in scene:
            xs = [p[0] for p in polygon]
            ys = [p[1] for p in polygon]
            x0, y0 = min(xs), min(ys)
            annotations.append({
                "id": annotation_id,
                "image_id": image_id,
                "category_id": COCO_CATEGORY_OF_SHAPE[shape][0],
                "segmentation": [[round(v, 2) for point in polygon for v in point]],
                "area": round(polygon_area(polygon), 2),
                "bbox": [round(x0, 2), round(y0, 2), round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
                "iscrowd": 0,
            })
            annotation_id += 1
        image_id += 1
    shape_of_category = {cat_id: f"synthetic-{shape}" for shape, (cat_id, _) in COCO_CATEGORY_OF_SHAPE.items()}
    coco = {
        "info": {"description": "vim2 synthetic shapes in COCO format (tools/make_synthetic_mm_data.py)",
                 "version": "1.0", "year": 2024, "contributor": "vim2", "date_created": "2024-01-01"},
        "licenses": [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cat_id, "name": name, "supercategory": shape_of_category.get(cat_id, "unused")}
                       for cat_id, name in COCO_CATEGORIES],
    }
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(coco, f)
    return image_id, annotation_id


def write_coco(root: Path, num_train: int, num_val: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    next_image, next_annotation = write_coco_split(root, "train", num_train, size, rng, 1, 1)
    write_coco_split(root, "val", num_val, size, rng, next_image, next_annotation)


def write_ade_split(root: Path, split: str, num_images: int, size: int, rng: np.random.Generator) -> None:
    """Writes ``images/{split}/ADE_*.jpg`` and the matching ``annotations/{split}/ADE_*.png`` label maps."""
    image_dir = root / "images" / split
    label_dir = root / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    stem = "ADE_train" if split == "training" else "ADE_val"
    for index in range(1, num_images + 1):
        scene = random_scene(rng, size)
        labels = Image.new("L", (size, size), ADE_BACKGROUND_LABEL)
        draw = ImageDraw.Draw(labels)
        for shape, polygon in scene:
            draw.polygon(polygon, fill=ADE_LABEL_OF_SHAPE[shape])
        label_array = np.array(labels)
        border = ADE_UNLABELLED_BORDER
        label_array[:border, :] = label_array[-border:, :] = ADE_UNLABELLED
        label_array[:, :border] = label_array[:, -border:] = ADE_UNLABELLED
        name = f"{stem}_{index:08d}"
        render(rng, size, scene).save(image_dir / f"{name}.jpg", quality=95)
        Image.fromarray(label_array, mode="L").save(label_dir / f"{name}.png")


def write_ade20k(root: Path, num_train: int, num_val: int, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    write_ade_split(root, "training", num_train, size, rng)
    write_ade_split(root, "validation", num_val, size, rng)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path,
                        help="output root; gets coco/ and ade/ADEChallengeData2016/ (use 'data' for the configs' defaults)")
    parser.add_argument("--only", choices=("coco", "ade20k"), default=None, help="write just one dataset")
    parser.add_argument("--num-train", type=int, default=8, help="training images per dataset (default 8)")
    parser.add_argument("--num-val", type=int, default=4, help="validation images per dataset (default 4)")
    parser.add_argument("--size", type=int, default=128, help="square image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_train < 1 or args.num_val < 1:
        parser.error("--num-train and --num-val must be >= 1")
    if args.size < 32:
        parser.error("--size must be >= 32 pixels")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.only in (None, "coco"):
        coco_root = args.out / "coco"
        write_coco(coco_root, args.num_train, args.num_val, args.size, args.seed)
        print(f"COCO-format data: {coco_root}")
    if args.only in (None, "ade20k"):
        ade_root = args.out / "ade" / "ADEChallengeData2016"
        write_ade20k(ade_root, args.num_train, args.num_val, args.size, args.seed)
        print(f"ADE20K-format data: {ade_root}")


if __name__ == "__main__":
    main()
