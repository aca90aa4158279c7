"""vim2-train: tiny runs that check checkpoints, exact resume, metrics.json and the ImageFolder path."""
import json

import numpy as np
import pytest
import torch

import timm
from vim2.train import build_parser, load_digits_split, main, train
from vim2.weights import export_main

# A smaller-than-test_vim2 ViM2 keeps each step well under a second on one CPU thread.
TINY = ["--model", "test_vim2", "--model-kwargs", '{"embed_dims": [8, 16, 24, 32], "depths": [2, 1, 1, 1]}',
        "--img-size", "32", "--batch-size", "16", "--no-progress", "--threads", "1", "--seed", "3"]


def _run(tmp_path, name, *extra):
    return train(build_parser().parse_args(TINY + ["--output", str(tmp_path / name)] + list(extra)))


def test_digits_split_is_fixed_and_stratified():
    x_train, x_val, y_train, y_val = load_digits_split()
    again = load_digits_split()
    assert x_train.shape == (1437, 8, 8) and x_val.shape == (360, 8, 8)
    assert np.array_equal(y_val, again[3])
    counts = np.bincount(y_val, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per class


def test_checkpoint_resume_reproduces_an_uninterrupted_run(tmp_path):
    subset = ["--train-subset", "48", "--val-subset", "32", "--epochs", "2"]
    straight = _run(tmp_path, "straight", *subset)
    first = _run(tmp_path, "split", *subset, "--stop-after", "1")
    assert first["epochs_done"] == 1 and len(first["history"]) == 1
    resumed = _run(tmp_path, "split", *subset, "--resume", "auto")
    assert resumed["resumed_from"].endswith("last.pth.tar")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]

    a = torch.load(tmp_path / "straight" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "split" / "last.pth.tar", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["scheduler"] == b["scheduler"]
    assert resumed["final_val_top1"] == straight["final_val_top1"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in straight["history"]]

    # metrics.json is what train() returned, written next to the checkpoint
    written = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert written["final_val_top1"] == straight["final_val_top1"]
    assert 0.0 <= written["final_val_top1"] <= 100.0 and written["num_train"] == 48 and written["num_val"] == 32
    assert written["train_time_s"] > 0 and len(written["history"]) == 2
    for key in ("optimizer", "scheduler", "rng", "args", "data_config", "label_names", "model_kwargs"):
        assert key in a, key

    # nothing left to do: a clear error, not a silent no-op
    assert main(TINY + ["--output", str(tmp_path / "split"), *subset, "--resume", "auto"]) == 2


def _write_image_folder(root, classes=("circle", "cross", "square"), per_split=(6, 3)):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_split):
        for label in classes:
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                image = Image.new("RGB", (40, 40), tuple(int(v) for v in rng.integers(0, 60, 3)))
                draw = ImageDraw.Draw(image)
                if label == "circle":
                    draw.ellipse((8, 8, 32, 32), outline="white", width=3)
                elif label == "cross":
                    draw.line((8, 8, 32, 32), fill="white", width=3)
                    draw.line((8, 32, 32, 8), fill="white", width=3)
                else:
                    draw.rectangle((8, 8, 32, 32), outline="white", width=3)
                image.save(root / split / label / f"{i}.png")


def test_image_folder_training_and_export(tmp_path, capsys):
    data = tmp_path / "shapes"
    _write_image_folder(data)
    metrics = _run(tmp_path, "shapes-run", "--data-dir", str(data), "--epochs", "1", "--model-ema")
    assert metrics["dataset"] == f"imagefolder:{data}"
    assert metrics["num_classes"] == 3 and metrics["num_train"] == 18 and metrics["num_val"] == 9
    assert "final_val_top1_ema" in metrics
    checkpoint = torch.load(tmp_path / "shapes-run" / "last.pth.tar", weights_only=True)
    assert checkpoint["label_names"] == ["circle", "cross", "square"]
    assert "state_dict_ema" in checkpoint

    # the training checkpoint exports to a directory that timm loads with the same weights
    out = tmp_path / "export"
    assert export_main([str(tmp_path / "shapes-run" / "last.pth.tar"), "-o", str(out)]) == 0
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert exported.pretrained_cfg["label_names"] == ["circle", "cross", "square"]
    for key, value in exported.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][key]), key


def test_bad_arguments_are_reported(tmp_path, capsys):
    assert main(TINY + ["--data-dir", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    assert "train/ and val/" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--epochs"):
        _run(tmp_path, "bad", "--epochs", "0")


def test_grad_checkpointing_option(tmp_path, monkeypatch):
    """--grad-checkpointing switches timm's block recomputation on; the model computes the same function
    (tests/models checks outputs and gradients), so the run's first loss matches a plain run's (after
    that AdamW's sign-like first steps amplify float rounding, so weights are not compared). The plain run
    is this process's first training run: seeding must not depend on what earlier runs imported."""
    built = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append(real_create(*a, **k)) or built[-1])
    subset = ["--train-subset", "16", "--val-subset", "16", "--epochs", "1", "--batch-size", "16"]
    plain = _run(tmp_path, "plain", *subset)
    recomputed = _run(tmp_path, "recomputed", *subset, "--grad-checkpointing")
    assert recomputed["args"]["grad_checkpointing"] is True
    assert not any(stage.grad_checkpointing for stage in built[0].stages)
    assert all(stage.grad_checkpointing for stage in built[1].stages)
    assert recomputed["history"][0]["train_loss"] == pytest.approx(plain["history"][0]["train_loss"], rel=1e-5)


def test_seeding_does_not_depend_on_draws_while_the_datasets_are_built(tmp_path, monkeypatch):
    """Building the datasets may import libraries that draw from the global RNGs (scikit-learn draws from
    Python's `random` on import, once per process); the run must be seeded after that."""
    import random

    import vim2.train as train_module

    subset = ["--train-subset", "16", "--val-subset", "16", "--epochs", "1", "--batch-size", "16"]
    quiet = _run(tmp_path, "quiet", *subset)
    real_build = train_module.build_datasets

    def build_and_draw(args):
        built = real_build(args)
        random.random(), np.random.rand(), torch.rand(1)
        return built

    monkeypatch.setattr(train_module, "build_datasets", build_and_draw)
    drawing = _run(tmp_path, "drawing", *subset)
    assert drawing["history"][0]["train_loss"] == quiet["history"][0]["train_loss"]
