"""Train a ViM2 end to end with timm's training components (the project's main job).

Default: ``test_vim2`` on scikit-learn's bundled handwritten digits (1797 8x8 grey images, 10
classes), upsampled to 32x32 RGB, with a fixed stratified 80/20 train/val split::

    vim2-train                                   # or: python tools/train.py
    vim2-train --data-dir path/to/imagefolder    # train/ and val/ subfolders of class folders
    vim2-train --resume auto                     # continue from <output>/last.pth.tar

Pieces: timm ``create_transform``/``create_loader`` (augmentation, loader), ``create_optimizer_v2``,
``create_scheduler_v2`` (per-step cosine with warmup), optional ``ModelEmaV3``, mixed precision
(bf16 autocast, or fp16 with ``NativeScaler`` on CUDA), tqdm progress, a checkpoint each epoch
(model, optimizer, scheduler, scaler, EMA, epoch, RNG states) that ``--resume`` continues from
exactly, top-1 evaluation each epoch, and ``metrics.json``. See ``docs/training.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

__all__ = ["build_parser", "main", "train", "DigitsDataset", "load_digits_split"]

DIGITS_NAME = "sklearn-digits"
CHECKPOINT_LAST = "last.pth.tar"
CHECKPOINT_BEST = "best.pth.tar"
METRICS_NAME = "metrics.json"


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------

class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's 8x8 digits as RGB PIL images upsampled to ``source_size`` pixels.

    ``transform`` (set by ``timm.data.create_loader``) maps a PIL image to a (3, H, W) float tensor.

    Args:
        images: (N, 8, 8) array with values 0..16.
        targets: (N,) int class ids 0..9.
        source_size: side of the stored upsampled images (bicubic), before timm's transforms.
    """

    def __init__(self, images: np.ndarray, targets: np.ndarray, source_size: int, transform=None):
        from PIL import Image

        if images.ndim != 3:
            raise ValueError(f"images: expected (N, H, W), got shape {images.shape}")
        grey = np.clip(images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        self.images = [
            Image.fromarray(g, mode="L").resize((source_size, source_size), Image.BICUBIC).convert("RGB")
            for g in grey
        ]
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def load_digits_split(val_fraction: float = 0.2, split_seed: int = 0) -> Tuple[np.ndarray, ...]:
    """The fixed stratified train/val split of ``sklearn.datasets.load_digits``.

    Returns:
        (train_images (N, 8, 8), train_targets, val_images, val_targets).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - scikit-learn is in the `train` extra
        raise ImportError("the default dataset needs scikit-learn: pip install 'vim2[train]'") from exc
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a value in (0, 1), got {val_fraction}")
    digits = load_digits()
    return tuple(train_test_split(
        digits.images, digits.target, test_size=val_fraction, stratify=digits.target, random_state=split_seed,
    ))


def _subset(dataset, limit: Optional[int], seed: int):
    """A fixed random subset of ``limit`` samples (for quick runs); keeps the ``transform`` attribute."""
    if not limit or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    if isinstance(dataset, DigitsDataset):
        dataset.images = [dataset.images[i] for i in order]
        dataset.targets = [dataset.targets[i] for i in order]
        return dataset
    return _TransformSubset(dataset, order)


class _TransformSubset(torch.utils.data.Subset):
    """``Subset`` that forwards ``transform`` to the wrapped dataset (timm's loader sets it)."""

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, value):
        self.dataset.transform = value


def build_datasets(args: argparse.Namespace) -> Tuple[Any, Any, List[str], str]:
    """(train dataset, val dataset, class names, dataset description)."""
    if args.data_dir:
        from timm.data import ImageDataset

        root = Path(args.data_dir)
        val_name = next((n for n in ("val", "validation", "test") if (root / n).is_dir()), None)
        if not (root / "train").is_dir() or val_name is None:
            raise ValueError(
                f"--data-dir: expected an ImageFolder layout with train/ and val/ subfolders in {root}"
            )
        classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
        if len(classes) < 2:
            raise ValueError(f"--data-dir: {root / 'train'} needs at least 2 class subfolders, found {classes}")
        class_map = {name: i for i, name in enumerate(classes)}
        train_set = ImageDataset(str(root / "train"), class_map=class_map)
        val_set = ImageDataset(str(root / val_name), class_map=class_map)
        description = f"imagefolder:{root}"
    else:
        x_train, x_val, y_train, y_val = load_digits_split(args.val_fraction)
        source_size = args.img_size
        train_set = DigitsDataset(x_train, y_train, source_size)
        val_set = DigitsDataset(x_val, y_val, source_size)
        classes = [str(i) for i in range(10)]
        description = DIGITS_NAME
    train_set = _subset(train_set, args.train_subset, args.seed)
    val_set = _subset(val_set, args.val_subset, args.seed + 1)
    if len(train_set) == 0 or len(val_set) == 0:
        raise ValueError("empty dataset: train and val need at least one image each")
    return train_set, val_set, classes, description


# --------------------------------------------------------------------------------------------------
# Precision, RNG, checkpoints
# --------------------------------------------------------------------------------------------------

def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``--amp`` (None = full fp32).

    ``auto``: bf16 on CUDA devices that support it, else fp16 (with a grad scaler); fp32 on CPU,
    where bf16 autocast measured slower for these models (docs/training.md).
    """
    if amp == "none":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    raise ValueError(f"--amp: expected auto, bf16, fp16 or none, got {amp!r}")


def _rng_state() -> Dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _save_atomic(obj: Dict[str, Any], path: Path) -> None:
    """Write through a temporary file so an interrupted save never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# --------------------------------------------------------------------------------------------------
# Train / evaluate
# --------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: Optional[torch.dtype],
             channels_last: bool = False) -> Dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over ``loader``."""
    model.eval()
    correct, seen, loss_sum = 0, 0, 0.0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp_dtype):
            logits = model(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        correct += (logits.argmax(dim=1) == targets).sum().item()
        seen += targets.numel()
    return {"top1": 100.0 * correct / max(seen, 1), "loss": loss_sum / max(seen, 1)}


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vim2-train",
        description="Train a ViM2 (default test_vim2 on scikit-learn's bundled digits) with timm's "
                    "training components; prints the final validation accuracy and writes metrics.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="test_vim2", help="timm model name (vim2_* after `import vim2`)")
    group.add_argument("--model-kwargs", type=json.loads, default=None,
                       help='JSON dict of extra constructor kwargs, e.g. \'{"d_state": 8}\'')
    group.add_argument("--drop-path", type=float, default=0.0, help="stochastic depth rate")
    group.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="recompute each block's forward in backward (timm's set_grad_checkpointing): "
                            "much less activation memory for some extra time")
    group.add_argument("--model-ema", action="store_true", help="also keep (and evaluate) an EMA of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.998)

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default=None,
                       help="ImageFolder root with train/ and val/ subfolders (default: sklearn digits)")
    group.add_argument("--img-size", type=int, default=32, help="input resolution (square)")
    group.add_argument("--val-fraction", type=float, default=0.2, help="digits: fixed stratified val share")
    group.add_argument("--train-subset", type=int, default=None, help="use only N training images")
    group.add_argument("--val-subset", type=int, default=None, help="use only N validation images")
    group.add_argument("--scale", type=float, nargs=2, default=(0.75, 1.0), help="random-resized-crop area range")
    group.add_argument("--hflip", type=float, default=0.0, help="horizontal flip prob (0: digits are not symmetric)")
    group.add_argument("--workers", type=int, default=0, help="data loader worker processes")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=8)
    group.add_argument("--batch-size", type=int, default=64)
    group.add_argument("--opt", default="adamw", help="timm optimizer name (create_optimizer_v2)")
    group.add_argument("--lr", type=float, default=3e-3)
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--sched", default="cosine", help="timm scheduler name (create_scheduler_v2)")
    group.add_argument("--warmup-epochs", type=int, default=1)
    group.add_argument("--warmup-lr", type=float, default=1e-4)
    group.add_argument("--min-lr", type=float, default=1e-5)
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--clip-grad", type=float, default=None, help="gradient norm clipping")

    group = parser.add_argument_group("run")
    group.add_argument("--output", default=None, help="output directory (default: runs/<model>-<dataset>)")
    group.add_argument("--resume", default=None,
                       help="checkpoint to continue from, or 'auto' for <output>/last.pth.tar if it exists")
    group.add_argument("--stop-after", type=int, default=None, metavar="N",
                       help="stop after N epochs of this run (split a long run; --resume continues it)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"),
                       help="mixed precision (auto: bf16/fp16 on CUDA, fp32 on CPU)")
    group.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (0: torch's default); 1 is fastest for the small default model "
                            "on a shared machine, see docs/training.md")
    group.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "img_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.stop_after is not None and args.stop_after < 1:
        raise ValueError(f"--stop-after: expected a positive integer, got {args.stop_after}")
    if args.threads is not None and args.threads < 0:
        raise ValueError(f"--threads: expected >= 0, got {args.threads}")
    if args.workers < 0:
        raise ValueError(f"--workers: expected >= 0, got {args.workers}")
    if args.model_kwargs is not None and not isinstance(args.model_kwargs, dict):
        raise TypeError(f"--model-kwargs: expected a JSON object, got {args.model_kwargs!r}")


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training described by ``args`` (see :func:`build_parser`); returns the metrics dict."""
    import timm
    import timm.data
    import timm.loss
    import timm.optim
    import timm.scheduler
    import timm.utils
    from tqdm import tqdm

    import vim2.models  # noqa: F401  registers the ViM2 family with timm

    _check_args(args)
    if args.threads:  # 0 / None: keep torch's default
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    amp_dtype = resolve_amp(args.amp, device)

    train_set, val_set, classes, dataset_name = build_datasets(args)  # split and subsets: their own seeds
    # Seeded after the datasets: their first use imports scikit-learn, which draws from Python's `random`
    # (which timm's crops use), so seeding before made a process's first run differ from its later ones.
    _seed_everything(args.seed)
    output = Path(args.output or Path("runs") / f"{args.model}-{dataset_name.split(':')[0]}")
    output.mkdir(parents=True, exist_ok=True)

    model_kwargs = dict(args.model_kwargs or {})
    model = timm.create_model(args.model, num_classes=len(classes), drop_path_rate=args.drop_path or None,
                              **model_kwargs)
    model.to(device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)

    # timm's loaders/transforms: random-resized-crop on train, resize+center-crop (crop_pct=1) on val
    data_config = timm.data.resolve_data_config(
        {"input_size": (3, args.img_size, args.img_size), "crop_pct": 1.0, "interpolation": "bicubic"},
        model=model,
    )
    batch_size = min(args.batch_size, len(train_set))
    common = dict(
        input_size=data_config["input_size"], interpolation=data_config["interpolation"],
        mean=data_config["mean"], std=data_config["std"], num_workers=args.workers,
        use_prefetcher=False, device=device, pin_memory=device.type == "cuda",
        persistent_workers=False,  # fresh workers each epoch draw seeds from the restored RNG on resume
    )
    train_loader = timm.data.create_loader(
        train_set, batch_size=batch_size, is_training=True, scale=tuple(args.scale), ratio=(0.85, 1.18),
        hflip=args.hflip, color_jitter=0.0, **common,
    )
    val_loader = timm.data.create_loader(
        val_set, batch_size=max(batch_size, 128), is_training=False, crop_pct=data_config["crop_pct"], **common,
    )

    optimizer = timm.optim.create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay)
    updates_per_epoch = len(train_loader)
    scheduler, num_epochs = timm.scheduler.create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False, updates_per_epoch=updates_per_epoch,
    )
    loss_scaler = timm.utils.NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    criterion = (timm.loss.LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0
                 else nn.CrossEntropyLoss())
    model_ema = timm.utils.ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None

    start_epoch, best_top1, best_epoch, history, elapsed_before = 0, -1.0, -1, [], 0.0
    resume = args.resume
    if resume == "auto":
        resume = str(output / CHECKPOINT_LAST) if (output / CHECKPOINT_LAST).is_file() else None
    if resume:
        checkpoint = torch.load(resume, map_location="cpu", weights_only=True)
        if checkpoint.get("arch") != args.model:
            raise ValueError(f"--resume: {resume} is a {checkpoint.get('arch')} checkpoint, not {args.model}")
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if loss_scaler is not None and checkpoint.get("amp_scaler"):
            loss_scaler.load_state_dict(checkpoint["amp_scaler"])
        if model_ema is not None and checkpoint.get("state_dict_ema"):
            model_ema.module.load_state_dict(checkpoint["state_dict_ema"])
        start_epoch = checkpoint["epoch"]
        best_top1, best_epoch = checkpoint.get("best_top1", -1.0), checkpoint.get("best_epoch", -1)
        history = list(checkpoint.get("history", []))
        elapsed_before = checkpoint.get("train_time_s", 0.0)
        _set_rng_state(checkpoint["rng"])
        print(f"vim2-train: resumed from {resume} after epoch {start_epoch}")

    n_params = sum(p.numel() for p in model.parameters())
    print(f"vim2-train: {args.model} ({n_params / 1e6:.3f}M params) on {dataset_name}: "
          f"{len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, "
          f"{args.img_size}px, device {device}, amp {amp_dtype or 'fp32'}, threads={torch.get_num_threads()}")

    run_start = time.perf_counter()
    num_updates = start_epoch * updates_per_epoch
    val_metrics: Dict[str, float] = history[-1]["val"] if history else {}
    end_epoch = num_epochs if args.stop_after is None else min(num_epochs, start_epoch + args.stop_after)
    if start_epoch >= end_epoch:
        raise ValueError(f"--epochs {args.epochs}: nothing to train, the checkpoint already finished "
                         f"{start_epoch} epochs")
    for epoch in range(start_epoch, end_epoch):
        epoch_start = time.perf_counter()
        model.train()
        loss_meter = timm.utils.AverageMeter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{num_epochs}", leave=False,
                   disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
        for images, targets in bar:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if args.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp_dtype):
                loss = criterion(model(images), targets)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch + 1}; lower --lr or use --amp none")
            optimizer.zero_grad(set_to_none=True)
            if loss_scaler is not None:
                loss_scaler(loss, optimizer, clip_grad=args.clip_grad, parameters=model.parameters())
            else:
                loss.backward()
                if args.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                optimizer.step()
            num_updates += 1
            if model_ema is not None:
                model_ema.update(model, step=num_updates)
            scheduler.step_update(num_updates=num_updates)
            loss_meter.update(loss.item(), images.shape[0])
            bar.set_postfix(loss=f"{loss_meter.avg:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        scheduler.step(epoch + 1)

        val_metrics = evaluate(model, val_loader, device, amp_dtype, args.channels_last)
        record = {"epoch": epoch + 1, "train_loss": loss_meter.avg, "val": val_metrics,
                  "lr": optimizer.param_groups[0]["lr"], "time_s": time.perf_counter() - epoch_start}
        if model_ema is not None:
            record["val_ema"] = evaluate(model_ema.module, val_loader, device, amp_dtype, args.channels_last)
        history.append(record)
        improved = val_metrics["top1"] > best_top1
        if improved:
            best_top1, best_epoch = val_metrics["top1"], epoch + 1
        ema_text = f", EMA top-1 {record['val_ema']['top1']:.2f}%" if model_ema is not None else ""
        print(f"epoch {epoch + 1}/{num_epochs}: train loss {loss_meter.avg:.4f}, val loss {val_metrics['loss']:.4f}, "
              f"val top-1 {val_metrics['top1']:.2f}%{ema_text} ({record['time_s']:.1f}s)", flush=True)

        checkpoint = {
            "arch": args.model, "model_kwargs": model_kwargs, "num_classes": len(classes),
            "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "metric": val_metrics["top1"],
            "best_top1": best_top1, "best_epoch": best_epoch, "history": history, "rng": _rng_state(),
            "train_time_s": elapsed_before + time.perf_counter() - run_start,
            "args": _jsonable(vars(args)), "data_config": _jsonable(data_config),
            "label_names": classes, "dataset": dataset_name,
        }
        if loss_scaler is not None:
            checkpoint["amp_scaler"] = loss_scaler.state_dict()
        if model_ema is not None:
            checkpoint["state_dict_ema"] = model_ema.module.state_dict()
        _save_atomic(checkpoint, output / CHECKPOINT_LAST)
        if improved:
            _save_atomic(checkpoint, output / CHECKPOINT_BEST)

    final = evaluate(model, val_loader, device, amp_dtype, args.channels_last)
    metrics = {
        "model": args.model, "model_kwargs": model_kwargs, "params": n_params, "dataset": dataset_name,
        "num_train": len(train_set), "num_val": len(val_set), "num_classes": len(classes),
        "img_size": args.img_size, "epochs": num_epochs, "epochs_done": end_epoch, "device": str(device),
        "amp": str(amp_dtype) if amp_dtype else "fp32", "threads": torch.get_num_threads(),
        "final_val_top1": final["top1"], "final_val_loss": final["loss"],
        "best_val_top1": best_top1, "best_epoch": best_epoch,
        "train_time_s": elapsed_before + time.perf_counter() - run_start,
        "resumed_from": resume, "checkpoint": str(output / CHECKPOINT_LAST), "history": history,
        "args": _jsonable(vars(args)),
    }
    if model_ema is not None:
        metrics["final_val_top1_ema"] = evaluate(model_ema.module, val_loader, device, amp_dtype,
                                                 args.channels_last)["top1"]
    (output / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"vim2-train: final validation top-1 {final['top1']:.2f}% (best {best_top1:.2f}% at epoch {best_epoch}), "
          f"{metrics['train_time_s']:.0f}s; wrote {output / METRICS_NAME} and {output / CHECKPOINT_LAST}")
    print(f"vim2-train: export with `vim2-export {output / CHECKPOINT_LAST} -o {output / 'export'}`")
    return metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``vim2-train``."""
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"vim2-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
