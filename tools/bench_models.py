#!/usr/bin/env python
"""Throughput and peak memory of ViM2-T against timm peers across input sizes, in one run.

For every (model, input size) a fresh worker process builds the model for that size and measures

* inference: ``model.eval()`` forward passes under ``torch.inference_mode``;
* one training step: forward, cross-entropy, backward and an AdamW step;

recording the median time per batch (images/s = batch / time) and the peak memory of each phase:
on CUDA ``torch.cuda.max_memory_allocated``; on CPU the growth of the worker's peak resident set
(Linux ``VmHWM``, reset between phases through ``/proc/self/clear_refs``) over its resident set
before the model was built, so weights, activations, gradients and optimizer state all count.

Fixed-size peers are built for each size: DeiT with ``img_size`` (a position embedding of the new
length; interpolation of pretrained ones does not matter for speed), Swin with ``img_size`` and its
7x7 windows (timm pads maps not divisible by 7), ConvNeXt/ResNet/ViM2 take any size. A peer that
cannot run gets ``n/a`` and the reason. A name with the suffix ``+eager_attn`` (e.g.
``deit_small_patch16_224+eager_attn``) builds the model with timm's explicit attention (``fused_attn =
False``: the whole attention map is materialised), the way attention ran in the baselines that the
vision-Mamba papers compared against; the summary then compares ViM2-T with both DeiT-S builds.

Outputs (``--out-dir``): ``bench.csv``, ``bench.md`` (tables + scaling summary), ``bench.png``.

``--paired ROUNDS`` adds time ratios that a drifting machine cannot skew: for each (size, mode) one
more worker builds every model and calls them in turn, ``ROUNDS`` rounds (order rotated each round),
and each peer's time is divided by ViM2-T's (else the first model's) time *of the same round*; the
median and range of those paired ratios go into ``paired.csv`` and the summary (times only: models
sharing a process share its memory). Why: on this project's shared cloud machine the speed of the
whole machine moved by 20% between two runs a day apart (DeiT-S 4.3 s, then 5.5 s) and by 10-20%
between the workers of one run, as much as the differences being measured.

``--thp`` runs every worker with PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` (Linux: CPU tensors of 2 MB and
more are backed by transparent huge pages), for every model alike. Without it each fresh multi-MB tensor
is faulted in 4 KB page by page; at 1024x1024 that is most of a ViM2-T training step's page faults
(docs/benchmarks.md). The header says which allocator setting a run had, and each CPU row how much of
the worker's memory ended up in huge pages (``huge_pages_mb``).

    python tools/bench_models.py --device cpu --batch-size 1 --repeats 2 --threads 2
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

DEFAULT_MODELS = ["vim2_tiny", "deit_small_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny", "resnet50"]
DEFAULT_SIZES = [224, 384, 512, 1024]
# A model name with this suffix is built with its attention computed explicitly (softmax(QK^T)V with the
# whole attention map in memory: timm's ``fused_attn=False`` path), as attention ran in the baselines of
# the vision-Mamba papers (2024); without it timm uses F.scaled_dot_product_attention (fused kernels).
EAGER_ATTN = "+eager_attn"
LABELS = {
    "vim2_tiny": "ViM2-T", "deit_small_patch16_224": "DeiT-S", "swin_tiny_patch4_window7_224": "Swin-T",
    "convnext_tiny": "ConvNeXt-T", "resnet50": "ResNet-50",
    "deit_small_patch16_224" + EAGER_ATTN: "DeiT-S (eager attention)",
}
FIELDS = ["model", "img_size", "mode", "batch_size", "device", "threads", "status", "time_ms", "images_per_s",
          "peak_mem_mb", "params_m", "repeats", "huge_pages_mb", "notes"]
# PyTorch's switch for huge-page-backed CPU tensors (c10's alloc_cpu reads it once, at the first allocation of
# a process: it has to be in a worker's environment from the start)
THP_ENV = "THP_MEM_ALLOC_ENABLE"
THP_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


# --------------------------------------------------------------------------------------------------
# Worker (one model, one size; runs in its own process)
# --------------------------------------------------------------------------------------------------

def _proc_kb(field: str, path: str = "/proc/self/status") -> Optional[int]:
    """A ``Field:  N kB`` line of a Linux /proc file (``VmRSS``/``VmHWM`` in status, ``AnonHugePages`` in
    smaps_rollup), in kB; None where the file or field is missing."""
    try:
        with open(path) as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def thp_system_mode() -> Optional[str]:
    """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'), None without THP (not
    Linux, or a kernel built without it)."""
    try:
        text = THP_SYSFS.read_text()
    except OSError:
        return None
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else None


def allocator_description(env: Dict[str, str]) -> str:
    """What a run's header says about the CPU allocator settings its workers get from ``env`` (PyTorch's
    huge pages and any glibc ``MALLOC_*`` tunables: both move time and peak memory, docs/benchmarks.md)."""
    if env.get(THP_ENV, "0") not in ("", "0"):
        text = f"CPU tensors >= 2 MB in transparent huge pages ({THP_ENV}=1, kernel mode {thp_system_mode()})"
    else:
        text = f"PyTorch's default CPU allocator (4 KB pages; {THP_ENV} not enabled)"
    glibc = [f"{key}={value}" for key, value in sorted(env.items()) if key.startswith("MALLOC_")]
    return text + (f", glibc tunables {' '.join(glibc)}" if glibc else "")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS
        return True
    except OSError:
        return False


def _build(name: str, size: int):
    import timm
    import vim2.models  # noqa: F401  registers vim2_*

    if name.endswith(EAGER_ATTN):
        model, notes = _build(name[:-len(EAGER_ATTN)], size)
        switched = [m for m in model.modules() if hasattr(m, "fused_attn")]
        if not switched:
            raise ValueError(f"{name}: the model has no attention layers with timm's fused_attn switch")
        for module in switched:
            module.fused_attn = False
        return model, ", ".join(filter(None, [notes, f"eager attention in {len(switched)} layers"]))
    notes = []
    kwargs: Dict[str, Any] = {}
    if name.startswith(("deit", "vit")):
        kwargs["img_size"] = size
        notes.append(f"img_size={size}")
    elif name.startswith("swin"):
        kwargs["img_size"] = size
        notes.append(f"img_size={size}, 7x7 windows")
    return timm.create_model(name, **kwargs), ", ".join(notes)


def _time(fn, warmup: int, repeats: int, sync, long_step: float) -> Tuple[float, int]:
    """Median seconds per call, and how many timed calls it is over.

    The first call is never the measurement: it pays one-off costs (Triton compiles its kernels on first
    use, which took 30 s of a 30.2 s ViM2-T training step at 1024 px on an H100). If it took ``long_step``
    seconds or more, a single further call is the measurement (repeating would blow the time budget);
    otherwise it counts as a warm-up call and ``repeats`` timed calls follow the remaining warm-ups.
    """
    start = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - start >= long_step:
        repeats = 1
    else:
        for _ in range(warmup - 1):
            fn()
        sync()
    times = []
    while len(times) < repeats:
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2], len(times)


def _worker_setup(spec: Dict[str, Any]):
    """A worker's thread count, then its (device, sync, autocast) from ``spec``."""
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["amp"] == "bf16"
                else torch.autocast(device.type, enabled=False))
    return device, sync, autocast


def run_worker(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Measure one (model, size) for every requested mode; returns CSV rows."""
    import torch

    device, sync, autocast = _worker_setup(spec)
    cuda = device.type == "cuda"
    base = dict(model=spec["model"], img_size=spec["size"], batch_size=spec["batch_size"], device=spec["device"],
                threads=torch.get_num_threads(), repeats=spec["repeats"])
    import timm  # noqa: F401  imported (and torch's CPU kernels touched) before the memory baseline
    import vim2.models  # noqa: F401
    torch.nn.functional.conv2d(torch.randn(1, 3, 16, 16), torch.randn(4, 3, 3, 3)).sum().item()
    rss_before = _proc_kb("VmRSS")
    try:
        model, notes = _build(spec["model"], spec["size"])
    except Exception as exc:  # a peer that cannot be built at this size
        return [dict(base, mode=m, status="n/a", notes=f"cannot build: {type(exc).__name__}: {exc}"[:300])
                for m in spec["modes"]]
    model.to(device)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    x = torch.randn(spec["batch_size"], 3, spec["size"], spec["size"], device=device)
    y = torch.randint(0, model.num_classes, (spec["batch_size"],), device=device)
    rows = []
    for mode in spec["modes"]:
        step = _make_step(model, mode, x, y, autocast)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        reset = _reset_peak_rss()
        try:
            seconds, timed = _time(step, spec["warmup"], spec["repeats"], sync, spec["long_step"])
        except Exception as exc:  # e.g. out of memory, unsupported size
            rows.append(dict(base, mode=mode, status="n/a", params_m=round(params_m, 2),
                             notes=f"{type(exc).__name__}: {exc}"[:300]))
            continue
        if cuda:
            peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            hwm = _proc_kb("VmHWM")
            # without a peak reset (non-Linux) the high-water mark covers everything so far
            peak_mb = (hwm - rss_before) / 1024 if hwm is not None and rss_before is not None else float("nan")
            if not reset:
                notes = (notes + ", " if notes else "") + "peak RSS not resettable: cumulative"
        rows.append(dict(base, mode=mode, status="ok", time_ms=round(seconds * 1e3, 2), repeats=timed,
                         images_per_s=round(spec["batch_size"] / seconds, 3), peak_mem_mb=round(peak_mb, 1),
                         params_m=round(params_m, 2), notes=notes))
        if not cuda:
            huge_kb = _proc_kb("AnonHugePages", "/proc/self/smaps_rollup")
            rows[-1]["huge_pages_mb"] = None if huge_kb is None else round(huge_kb / 1024, 1)
        if mode == "train":
            del step
            model.zero_grad(set_to_none=True)
    return rows


def _make_step(model, mode: str, x, y, autocast):
    """One inference call (``mode='infer'``) or one training step with its own AdamW, as a closure."""
    import torch

    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast:
                model(x)
        return step
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run_paired_worker(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every model of ``spec["models"]`` in one process, called in turn for ``spec["rounds"]`` rounds
    (after one untimed call each) in the one mode of ``spec["modes"]``; returns one row per model with
    its per-round times in ms."""
    import torch

    device, sync, autocast = _worker_setup(spec)
    (mode,) = spec["modes"]
    x = torch.randn(spec["batch_size"], 3, spec["size"], spec["size"], device=device)
    steps, rows = {}, []
    base = dict(img_size=spec["size"], mode=mode, batch_size=spec["batch_size"], device=spec["device"])
    for name in spec["models"]:
        try:
            model, _ = _build(name, spec["size"])
            model.to(device)
            y = torch.randint(0, model.num_classes, (spec["batch_size"],), device=device)
            steps[name] = _make_step(model, mode, x, y, autocast)
            steps[name]()  # untimed: one-off costs (allocations, kernel compilation)
            sync()
        except Exception as exc:
            rows.append(dict(base, model=name, status="n/a", notes=f"{type(exc).__name__}: {exc}"[:300]))
            steps.pop(name, None)
    times: Dict[str, List[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(spec["rounds"]):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:  # rotated: no model always runs right after another
            start = time.perf_counter()
            steps[name]()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    rows += [dict(base, model=name, status="ok", times_ms=t) for name, t in times.items()]
    return rows


def paired_ratios(rows: List[Dict[str, Any]], focus: str = "vim2_tiny") -> List[Dict[str, Any]]:
    """Per peer: its time over ``focus``'s time of the same round (> 1: ``focus`` is faster), median and
    range over the rounds, from the rows of :func:`run_paired_worker` (one size and mode)."""
    ok = {r["model"]: r["times_ms"] for r in rows if r.get("status") == "ok"}
    if focus not in ok:
        return []
    out, first = [], rows[0]
    for name, peer_times in ok.items():
        if name == focus:
            continue
        ratios = sorted(p / f for p, f in zip(peer_times, ok[focus]))
        out.append(dict(model=name, focus=focus, img_size=first["img_size"], mode=first["mode"],
                        rounds=len(ratios), focus_median_ms=round(statistics.median(ok[focus]), 1),
                        peer_median_ms=round(statistics.median(peer_times), 1),
                        ratio_median=round(statistics.median(ratios), 3), ratio_min=round(ratios[0], 3),
                        ratio_max=round(ratios[-1], 3), focus_faster_rounds=sum(r > 1 for r in ratios)))
    return out


def describe_paired(r: Dict[str, Any]) -> str:
    focus, peer, ratio = LABELS.get(r["focus"], r["focus"]), LABELS.get(r["model"], r["model"]), r["ratio_median"]
    verdict = f"faster (x{ratio:.2f})" if ratio > 1 else f"slower (x{1 / ratio:.2f})"
    return (f"- paired, {r['mode']} at {r['img_size']}x{r['img_size']}: {focus} is {verdict} than {peer}, median "
            f"of {r['rounds']} rounds interleaved in one process (per-round time ratio {peer}/{focus} "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}, {focus} faster in {r['focus_faster_rounds']} of "
            f"{r['rounds']}; medians {r['focus_median_ms']:.0f} vs {r['peer_median_ms']:.0f} ms)")


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------

def _machine_description(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)} logical CPUs"
    except OSError:
        pass
    text = f"{cpu}; torch {torch.__version__}; Python {platform.python_version()}"
    if device.startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(0)}; " + text
    try:  # which code was measured: the checkout's commit, and whether model/kernel files differ from it
        repo = Path(__file__).resolve().parents[1]
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "vim2"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if head:
            text += f"; checkout at {head}{' with uncommitted kernel/model changes' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = os.getloadavg()
        text += f"; load average at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    except OSError:
        pass
    return text


def _fit_slope(points: List[tuple]) -> Optional[float]:
    """Least-squares slope of log(time) against log(pixels): 1.0 = linear in pixel count."""
    if len(points) < 2:
        return None
    xs = [math.log(p) for p, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    denom = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / denom if denom else None


def summarise(rows: List[Dict[str, Any]], focus: str = "vim2_tiny", peer: str = "deit_small_patch16_224") -> List[str]:
    """Scaling of ``focus`` with pixel count, and ``focus`` vs ``peer`` at the largest common size (and vs
    the peer's eager-attention build when it was measured too)."""
    lines = []
    ok = [r for r in rows if r.get("status") == "ok"]
    peers = [peer] + ([peer + EAGER_ATTN] if any(r["model"] == peer + EAGER_ATTN for r in ok) else [])
    for mode in ("infer", "train"):
        for name in (focus, *peers):
            pts = sorted((int(r["img_size"]) ** 2, float(r["time_ms"])) for r in ok
                         if r["model"] == name and r["mode"] == mode)
            slope = _fit_slope(pts)
            if slope is None:
                continue
            (p0, t0), (p1, t1) = pts[0], pts[-1]
            lines.append(
                f"- {LABELS.get(name, name)} {mode}: time grows as pixels^{slope:.2f} (log-log fit over "
                f"{len(pts)} sizes); {int(math.sqrt(p0))}->{int(math.sqrt(p1))}: pixels x{p1 / p0:.1f}, "
                f"time x{t1 / t0:.1f}"
            )
        for other in peers:
            lines.extend(_head_to_head(ok, mode, focus, other))
    return lines


def _head_to_head(ok: List[Dict[str, Any]], mode: str, focus: str, peer: str) -> List[str]:
    """``focus`` vs ``peer`` in ``mode`` at the largest size both were measured at (no line if none)."""
    both: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for r in ok:
        if r["mode"] == mode and r["model"] in (focus, peer):
            both.setdefault(int(r["img_size"]), {})[r["model"]] = r
    common = [s for s, v in both.items() if len(v) == 2]
    if not common:
        return []
    size = max(common)
    a, b = both[size][focus], both[size][peer]
    speed = float(b["time_ms"]) / float(a["time_ms"])
    mem = float(b["peak_mem_mb"]) / float(a["peak_mem_mb"]) if float(a["peak_mem_mb"]) > 0 else float("nan")
    return [
        f"- {mode} at {size}x{size}: {LABELS.get(focus, focus)} {float(a['time_ms']):.0f} ms, "
        f"{float(a['peak_mem_mb']):.0f} MB vs {LABELS.get(peer, peer)} {float(b['time_ms']):.0f} ms, "
        f"{float(b['peak_mem_mb']):.0f} MB: {LABELS.get(focus, focus)} is "
        f"{'faster' if speed > 1 else 'slower'} (x{speed if speed > 1 else 1 / speed:.2f}) and "
        f"{'lighter' if mem > 1 else 'heavier'} (x{mem if mem > 1 else 1 / mem:.2f})"
    ]


def write_markdown(rows: List[Dict[str, Any]], path: Path, header: str, summary: List[str]) -> None:
    sizes = sorted({int(r["img_size"]) for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    index = {(r["model"], int(r["img_size"]), r["mode"]): r for r in rows}
    out = [header, ""]
    for mode, title in (("infer", "Inference"), ("train", "One training step (forward + backward + AdamW)")):
        if not any(r["mode"] == mode for r in rows):
            continue
        out += [f"#### {title}: images/s | peak memory (MB)", "",
                "| model | " + " | ".join(f"{s}x{s}" for s in sizes) + " |",
                "|---|" + "---|" * len(sizes)]
        for name in models:
            cells = []
            for s in sizes:
                r = index.get((name, s, mode))
                if r is None:
                    cells.append("-")
                elif r["status"] != "ok":
                    cells.append(f"n/a ({r.get('notes', '')[:60]})")
                else:
                    cells.append(f"{float(r['images_per_s']):.3g} \\| {float(r['peak_mem_mb']):.0f}")
            out.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
        out.append("")
    if summary:
        out += ["#### Scaling", ""] + summary + [""]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def plot(rows: List[Dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    modes = [m for m in ("infer", "train") if any(r["mode"] == m for r in ok)]
    fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 9), squeeze=False)
    for col, mode in enumerate(modes):
        for name in dict.fromkeys(r["model"] for r in ok):
            pts = sorted((int(r["img_size"]), float(r["time_ms"]) / int(r["batch_size"]), float(r["peak_mem_mb"]))
                         for r in ok if r["model"] == name and r["mode"] == mode)
            if not pts:
                continue
            sizes = [p[0] for p in pts]
            style = dict(marker="o", linewidth=2.5 if name == "vim2_tiny" else 1.2, label=LABELS.get(name, name))
            axes[0][col].plot(sizes, [p[1] for p in pts], **style)
            axes[1][col].plot(sizes, [p[2] for p in pts], **style)
            if name == "vim2_tiny":  # where its time would be if it grew exactly with pixel count
                ref = [pts[0][1] * (s / sizes[0]) ** 2 for s in sizes]
                axes[0][col].plot(sizes, ref, "k:", linewidth=1, label="ViM2-T, linear in pixels")
        for row, ylabel in ((0, "time per image (ms)"), (1, "peak memory (MB)")):
            ax = axes[row][col]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(sorted({int(r["img_size"]) for r in ok}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("input size (pixels per side)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{'inference' if mode == 'infer' else 'training step'}: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def snapshot_code(dest: Path) -> Optional[str]:
    """Copy the committed ``vim2`` and ``vim2_kernels`` (kernels/) sources of this checkout to ``dest``.

    Workers import from the snapshot (``PYTHONPATH``), so commits landing in the working tree during a
    long run cannot mix code versions within one table. Returns the commit, or None outside git.
    """
    repo = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        archive = subprocess.run(["git", "archive", head, "kernels", "vim2"], cwd=repo, capture_output=True,
                                 timeout=60, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    (dest / "kernels").rename(dest / "vim2_kernels")
    return head


def measure_in_subprocess(spec: Dict[str, Any], timeout: float, env: Optional[Dict[str, str]] = None
                          ) -> List[Dict[str, Any]]:
    """Run :func:`run_worker` for ``spec`` in a fresh Python process; failures become ``n/a`` rows."""
    def failed(reason: str) -> List[Dict[str, Any]]:
        return [dict(model=name, img_size=spec["size"], mode=m, batch_size=spec["batch_size"],
                     device=spec["device"], status="n/a", notes=reason[:300])
                for name in spec.get("models", [spec.get("model")]) for m in spec["modes"]]

    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return failed(f"timeout after {timeout:.0f}s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_ROWS ")]
    if proc.returncode != 0 or not lines:
        if proc.returncode in (-9, 137):
            return failed("worker killed (out of memory?)")
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return failed(f"worker failed: {tail[0]}")
    return json.loads(lines[-1][len("BENCH_ROWS "):])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=DEFAULT_SIZES)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (the first call is never timed)")
    parser.add_argument("--long-step", type=float, default=30.0,
                        help="after a first call of this many seconds, one further call is the measurement (no more warm-up/repeats)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast dtype")
    parser.add_argument("--skip", nargs="+", default=[], metavar="MODEL:SIZE:MODE",
                        help="measurements to leave out (recorded as n/a), e.g. vim2_tiny:1024:train")
    parser.add_argument("--worker-timeout", type=float, default=900, help="seconds per (model, size) worker")
    parser.add_argument("--out-dir", default="bench_out", help="where bench.csv/.md/.png go")
    parser.add_argument("--live-code", action="store_true",
                        help="workers import the working tree as it is at each measurement instead of a "
                             "snapshot of the committed code taken at the start")
    parser.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                        help="also time all models interleaved in one process for this many rounds per "
                             "(size, mode), and report each peer's time over ViM2-T's of the same round")
    parser.add_argument("--thp", action="store_true",
                        help=f"run every worker with {THP_ENV}=1: CPU tensors of 2 MB and more in transparent huge "
                             "pages (Linux), for all models alike")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        rows = run_paired_worker(spec) if "rounds" in spec else run_worker(spec)
        print("BENCH_ROWS " + json.dumps(rows), flush=True)
        return 0
    if args.batch_size < 1 or args.repeats < 1 or args.warmup < 0 or args.paired < 0:
        raise SystemExit("--batch-size and --repeats must be >= 1, --warmup and --paired >= 0")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available here (torch.cuda.is_available() is False)")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = _machine_description(args.device)
    worker_env = dict(os.environ)
    if args.thp:
        thp_mode = thp_system_mode()
        if thp_mode not in ("always", "madvise"):
            raise SystemExit(f"--thp: this system has no transparent huge pages to use (kernel mode: {thp_mode}; "
                             f"{THP_SYSFS} {'says never' if thp_mode == 'never' else 'is missing'})")
        worker_env[THP_ENV] = "1"
    if args.device == "cpu":
        machine += f"; {allocator_description(worker_env)}"
    snapshot_dir = None
    if not args.live_code:
        snapshot_dir = tempfile.TemporaryDirectory(prefix="vim2-bench-code-")
        commit = snapshot_code(Path(snapshot_dir.name))
        if commit:
            worker_env["PYTHONPATH"] = os.pathsep.join(
                [snapshot_dir.name] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
            machine += f"; vim2/vim2_kernels code frozen at commit {commit} for the whole run"
    print(f"bench: {machine}", flush=True)
    rows: List[Dict[str, Any]] = []
    start = time.perf_counter()
    for size in args.sizes:
        for name in args.models:
            for mode in args.modes:  # one process per measurement: clean peak memory, no state carried over
                spec = dict(model=name, size=size, batch_size=args.batch_size, device=args.device,
                            threads=args.threads, repeats=args.repeats, warmup=args.warmup, modes=[mode],
                            amp=args.amp, long_step=args.long_step)
                t0 = time.perf_counter()
                if f"{name}:{size}:{mode}" in args.skip:
                    new = [dict(model=name, img_size=size, mode=mode, batch_size=args.batch_size,
                                device=args.device, status="n/a", notes="skipped (--skip): over this run's time budget")]
                else:
                    new = measure_in_subprocess(spec, args.worker_timeout, worker_env)
                rows.extend(new)
                for r in new:
                    shown = (f"{r['images_per_s']:.3g} img/s, {r['time_ms']:.0f} ms, {r['peak_mem_mb']:.0f} MB"
                             if r["status"] == "ok" else f"n/a: {r.get('notes', '')}")
                    print(f"bench: {name:30s} {size:5d} {r['mode']:5s} {shown} "
                          f"({time.perf_counter() - t0:.0f}s)", flush=True)
                with (out_dir / "bench.csv").open("w", newline="") as handle:  # rewritten as results arrive
                    writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(rows)
    paired: List[Dict[str, Any]] = []
    focus = "vim2_tiny" if "vim2_tiny" in args.models else args.models[0]  # the model the ratios divide by
    for size in args.sizes if args.paired else []:
        for mode in args.modes:
            spec = dict(models=args.models, size=size, batch_size=args.batch_size, device=args.device,
                        threads=args.threads, rounds=args.paired, modes=[mode], amp=args.amp)
            t0 = time.perf_counter()
            worker_rows = measure_in_subprocess(spec, args.worker_timeout * len(args.models), worker_env)
            for r in worker_rows:
                if r["status"] != "ok":
                    print(f"bench: paired {r['model']:30s} {size:5d} {mode:5s} n/a: {r.get('notes', '')}", flush=True)
            for r in paired_ratios(worker_rows, focus):
                paired.append(r)
                print(f"bench: {describe_paired(r)[2:]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if paired:
        with (out_dir / "paired.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(paired[0]))
            writer.writeheader()
            writer.writerows(paired)
    total = time.perf_counter() - start
    header = (f"Measured {time.strftime('%Y-%m-%d %H:%M')} on {machine}; device {args.device}, batch "
              f"{args.batch_size}, threads {args.threads or 'default'}, amp {args.amp}, median of {args.repeats} "
              f"after {args.warmup} warm-up (after a first call over {args.long_step:.0f}s one further call is the measurement); "
              f"whole run {total / 60:.1f} min.")
    summary = summarise(rows) + [describe_paired(r) for r in paired]
    write_markdown(rows, out_dir / "bench.md", header, summary)
    if not any(r.get("status") == "ok" for r in rows):
        print(f"bench: no measurement succeeded (errors above); wrote {out_dir / 'bench.csv'}, {out_dir / 'bench.md'}")
        return 1
    plot(rows, out_dir / "bench.png", f"ViM2-T vs timm peers, {args.device}, batch {args.batch_size}")
    print("\n".join(summary))
    print(f"bench: wrote {out_dir / 'bench.csv'}, {out_dir / 'bench.md'}, {out_dir / 'bench.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
