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
