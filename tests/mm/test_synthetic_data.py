"""tools/make_synthetic_mm_data.py writes what pycocotools, mmdet and mmseg read as COCO / ADE20K."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mm_helpers import SYNTHETIC_IMAGE_SIZE, skip_without_mm

skip_without_mm()

from pycocotools.coco import COCO  # noqa: E402

pytestmark = pytest.mark.mm


def test_coco_layout_boxes_and_polygons_agree(synthetic_data):
    root = synthetic_data / "coco"
    for split in ("train", "val"):
        ann_file = root / "annotations" / f"instances_{split}2017.json"
        raw = json.loads(ann_file.read_text())
        assert set(raw) == {"info", "licenses", "images", "annotations", "categories"}
        assert len(raw["categories"]) == 80 and raw["categories"][0] == {
            "id": 1, "name": "person", "supercategory": "synthetic-square"}
        coco = COCO(str(ann_file))
        assert len(coco.getImgIds()) == 2
        for image in coco.loadImgs(coco.getImgIds()):
            path = root / f"{split}2017" / image["file_name"]
            with Image.open(path) as img:
                assert img.format == "JPEG" and img.size == (image["width"], image["height"])
        annotations = coco.loadAnns(coco.getAnnIds())
        assert annotations and {a["category_id"] for a in annotations} <= {1, 2, 3}
        for ann in annotations:
            mask = coco.annToMask(ann)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            # the rasterised polygon fills its box and its area
            assert xs.min() >= np.floor(x) and xs.max() <= np.ceil(x + w)
            assert ys.min() >= np.floor(y) and ys.max() <= np.ceil(y + h)
            assert abs(mask.sum() - ann["area"]) <= 0.1 * ann["area"] + 10
    # image ids are unique across splits, as in COCO
    train = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    val = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}


def test_mmdet_coco_dataset_reads_it(synthetic_data):
    from mmdet.datasets import CocoDataset
    from mmengine.registry import DefaultScope

    with DefaultScope.overwrite_default_scope("mmdet"):  # transforms by name, as configs use them
        dataset = CocoDataset(
            data_root=str(synthetic_data / "coco") + "/", ann_file="annotations/instances_train2017.json",
            data_prefix=dict(img="train2017/"), filter_cfg=dict(filter_empty_gt=True, min_size=32),
            pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True, with_mask=True)])
        assert len(dataset) == 2
        sample = dataset[0]
    assert sample["img"].shape == (SYNTHETIC_IMAGE_SIZE, SYNTHETIC_IMAGE_SIZE, 3)
    labels = sample["gt_bboxes_labels"]
    assert len(labels) >= 1 and set(labels.tolist()) <= {0, 1, 2}
    masks = sample["gt_masks"].to_ndarray()
    assert masks.shape == (len(labels), SYNTHETIC_IMAGE_SIZE, SYNTHETIC_IMAGE_SIZE) and masks.sum() > 0


def test_ade20k_layout_and_reduce_zero_label(synthetic_data):
    from mmengine.registry import DefaultScope
    from mmseg.datasets import ADE20KDataset

    root = synthetic_data / "ade" / "ADEChallengeData2016"
    for split, stem in (("training", "ADE_train"), ("validation", "ADE_val")):
        images = sorted((root / "images" / split).glob("*.jpg"))
        labels = sorted((root / "annotations" / split).glob("*.png"))
        assert [p.stem for p in images] == [p.stem for p in labels] == [f"{stem}_{i:08d}" for i in (1, 2)]
        for path in labels:
            with Image.open(path) as label:
                assert label.mode == "L"
                values = set(np.unique(np.array(label)).tolist())
            assert 0 in values and 1 in values and values <= {0, 1, 3, 5, 13}

    with DefaultScope.overwrite_default_scope("mmseg"):
        dataset = ADE20KDataset(
            data_root=str(root), data_prefix=dict(img_path="images/validation", seg_map_path="annotations/validation"),
            pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True)])
        assert len(dataset) == 2
        seg = dataset[0]["gt_seg_map"]
    # raw 0 ("other") -> 255 (ignored), classes k -> k - 1
    assert set(np.unique(seg).tolist()) <= {255, 0, 2, 4, 12} and 255 in seg and 0 in seg
