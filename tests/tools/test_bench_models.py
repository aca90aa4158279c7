"""tools/bench_models.py end to end on the CPU, at a size where it takes seconds (the numbers themselves
are the script's business; here: it runs, writes its files, and says when nothing was measured)."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "bench_models.py"


def run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--live-code", "--sizes", "64",
                           "--repeats", "1", "--warmup", "0", "--threads", "1", "--out-dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=600, env=env)


def test_measures_and_writes_csv_markdown_and_plot(tmp_path):
    proc = run(tmp_path, "--models", "test_vim2", "--modes", "infer", "train")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [(r["model"], r["mode"], r["status"]) for r in rows] == [("test_vim2", "infer", "ok"),
                                                                    ("test_vim2", "train", "ok")]
    assert all(float(r["time_ms"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert (tmp_path / "bench.md").read_text().count("test_vim2") >= 1
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_paired_rounds_interleave_models_and_report_ratios(tmp_path):
    proc = run(tmp_path, "--models", "test_vim2", "test_convnext", "no_such_model_xyz", "--modes", "infer",
               "--paired", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(open(tmp_path / "paired.csv")))
    assert [(r["model"], r["focus"], r["rounds"]) for r in rows] == [("test_convnext", "test_vim2", "3")]
    r = rows[0]
    assert float(r["ratio_min"]) <= float(r["ratio_median"]) <= float(r["ratio_max"])
    assert "paired, infer at 64x64" in (tmp_path / "bench.md").read_text()
    assert "paired no_such_model_xyz" in proc.stdout  # a peer that cannot be built is named, not fatal


def test_paired_ratios_divide_within_each_round():
    bench = _bench_module()
    rows = [dict(model="vim2_tiny", status="ok", img_size=1024, mode="infer", times_ms=[10.0, 20.0, 40.0]),
            dict(model="deit_small_patch16_224", status="ok", img_size=1024, mode="infer",
                 times_ms=[11.0, 30.0, 40.0]),
            dict(model="resnet50", status="n/a", img_size=1024, mode="infer")]
    (r,) = bench.paired_ratios(rows)
    # per round 1.1, 1.5, 1.0: the median of the paired ratios, not the ratio of medians (30 / 20)
    assert (r["model"], r["ratio_median"], r["ratio_min"], r["ratio_max"]) == ("deit_small_patch16_224", 1.1, 1.0, 1.5)
    assert r["focus_faster_rounds"] == 2  # a tie (1.0) is not a round that ViM2-T won
    assert "ViM2-T is faster (x1.10) than DeiT-S" in bench.describe_paired(r)
    assert "ViM2-T faster in 2 of 3" in bench.describe_paired(r)
    assert bench.paired_ratios(rows[1:]) == []  # no focus model measured: nothing to pair


def test_says_so_when_nothing_was_measured(tmp_path):
    proc = run(tmp_path, "--models", "no_such_model_xyz", "--modes", "infer")
    assert proc.returncode == 1
    assert "no measurement succeeded" in proc.stdout
    assert not (tmp_path / "bench.png").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where CUDA is missing")
def test_cuda_request_without_cuda_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "CUDA is not available" in proc.stderr


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_models_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _StepWithSlowFirstCall:
    """A step whose first call pays a one-off cost (like Triton compiling its kernels), then is fast."""

    def __init__(self, first_seconds):
        self.first_seconds, self.calls = first_seconds, 0

    def __call__(self):
        import time

        self.calls += 1
        time.sleep(self.first_seconds if self.calls == 1 else 0.001)


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_first_call_is_never_the_measurement(warmup):
    bench = _bench_module()
    # A first call over long_step: exactly one further call is timed, without the one-off cost.
    slow_first = _StepWithSlowFirstCall(0.3)
    seconds, timed = bench._time(slow_first, warmup=warmup, repeats=5, sync=lambda: None, long_step=0.2)
    assert (timed, slow_first.calls) == (1, 2) and seconds < 0.1
    # Otherwise the first call is a warm-up: `repeats` timed calls after `warmup` untimed ones in all.
    quick_first = _StepWithSlowFirstCall(0.05)
    seconds, timed = bench._time(quick_first, warmup=warmup, repeats=5, sync=lambda: None, long_step=0.2)
    assert (timed, quick_first.calls) == (5, max(warmup, 1) + 5) and seconds < 0.04


def test_eager_attention_build_computes_the_same_function():
    bench = _bench_module()
    torch.manual_seed(0)
    fused, _ = bench._build("deit_tiny_patch16_224", 64)
    eager, notes = bench._build("deit_tiny_patch16_224" + bench.EAGER_ATTN, 64)
    eager.load_state_dict(fused.state_dict())
    switches = [m.fused_attn for m in eager.modules() if hasattr(m, "fused_attn")]
    assert len(switches) == 12 and not any(switches) and "eager attention in 12 layers" in notes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(eager.eval()(x), fused.eval()(x), rtol=1e-4, atol=1e-5)


def test_eager_attention_on_a_model_without_attention_is_refused():
    bench = _bench_module()
    with pytest.raises(ValueError, match=r"resnet18\+eager_attn: the model has no attention layers"):
        bench._build("resnet18" + bench.EAGER_ATTN, 64)


def test_summary_compares_with_both_deit_builds():
    bench = _bench_module()
    rows = [dict(model=name, img_size=size, mode="infer", status="ok", time_ms=t, peak_mem_mb=m)
            for name, size, t, m in [("vim2_tiny", 512, 100.0, 50.0), ("vim2_tiny", 1024, 400.0, 200.0),
                                     ("deit_small_patch16_224", 1024, 500.0, 100.0),
                                     ("deit_small_patch16_224" + bench.EAGER_ATTN, 1024, 800.0, 400.0)]]
    text = "\n".join(bench.summarise(rows))
    assert "vs DeiT-S 500 ms, 100 MB: ViM2-T is faster (x1.25) and heavier (x2.00)" in text
    assert "vs DeiT-S (eager attention) 800 ms, 400 MB: ViM2-T is faster (x2.00) and lighter (x2.00)" in text


def test_peak_activation_memory_counts_what_a_forward_allocates():
    sys.path.insert(0, str(SCRIPT.parent))
    from peak_activation_memory import peak_activation_mb

    small, weights = peak_activation_mb("test_vim2", 64)
    large, _ = peak_activation_mb("test_vim2", 128)
    assert 0 < small < large  # 4x the pixels: more live activations
    with_grad, _ = peak_activation_mb("test_vim2", 64, train=True)
    assert with_grad > small  # autograd keeps intermediates alive
    import timm

    expected = sum(p.numel() * p.element_size() for p in timm.create_model("test_vim2").parameters())
    assert weights == expected / 2**20


def test_thp_option_reaches_the_workers_and_the_header(tmp_path):
    bench = _bench_module()
    if bench.thp_system_mode() not in ("always", "madvise"):
        pytest.skip("this system has no transparent huge pages")
    proc = run(tmp_path, "--models", "test_vim2", "--modes", "infer", "--thp")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{bench.THP_ENV}=1" in (tmp_path / "bench.md").read_text()
    (row,) = csv.DictReader(open(tmp_path / "bench.csv"))
    assert row["status"] == "ok" and float(row["huge_pages_mb"]) >= 0


def test_default_run_names_the_default_allocator(tmp_path):
    env_before = os.environ.pop(_bench_module().THP_ENV, None)
    try:
        proc = run(tmp_path, "--models", "test_vim2", "--modes", "infer")
    finally:
        if env_before is not None:
            os.environ[_bench_module().THP_ENV] = env_before
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "default CPU allocator (4 KB pages" in (tmp_path / "bench.md").read_text()


def test_allocator_description_names_huge_pages_and_glibc_tunables():
    bench = _bench_module()
    text = bench.allocator_description({bench.THP_ENV: "1", "MALLOC_MMAP_THRESHOLD_": "2097152", "HOME": "/x"})
    assert f"{bench.THP_ENV}=1" in text and "MALLOC_MMAP_THRESHOLD_=2097152" in text and "HOME" not in text
    assert "default CPU allocator" in bench.allocator_description({bench.THP_ENV: "0"})


def test_thp_without_huge_pages_is_a_clear_error(tmp_path):
    bench = _bench_module()
    bench.THP_SYSFS = tmp_path / "no_transparent_hugepage_here"
    with pytest.raises(SystemExit, match="--thp: this system has no transparent huge pages"):
        bench.main(["--thp", "--models", "test_vim2", "--sizes", "64", "--out-dir", str(tmp_path)])
