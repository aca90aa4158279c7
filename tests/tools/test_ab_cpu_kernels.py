"""tools/ab_cpu_kernels.py: builds a revision's C sources beside the working tree's and times both."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vim2_kernels.selective_scan import cpu_backend

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "ab_cpu_kernels.py"
in_git_checkout = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0
pytestmark = [
    pytest.mark.skipif(not in_git_checkout, reason="needs the project's git history"),
    pytest.mark.skipif(cpu_backend.unavailable_reason(torch.device("cpu")) is not None,
                       reason="needs the compiled CPU kernels"),
]


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_compares_every_op_against_a_revision():
    proc = run("--base", "HEAD", "--rounds", "2", "--shape", "2", "40", "37", "4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    assert set(lines) == {"scan_fwd", "scan_bwd", "channel_mixer"}
    for line in lines.values():
        assert "as fast (per-round" in line
        # HEAD's kernels compute what the working tree's do, up to the changes under test
        assert float(line.rsplit(" ", 1)[1]) < 1e-3, line


def test_unknown_revision_is_named():
    proc = run("--base", "no-such-revision-xyz", "--rounds", "1", "--ops", "scan_fwd")
    assert proc.returncode != 0 and "no-such-revision-xyz" in proc.stderr


BEFORE_DECAY_CHANGE = "2d314ba"  # the last revision with the degree-6 decays (5b9943b changed them)


@pytest.mark.skipif(subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", BEFORE_DECAY_CHANGE],
                                   capture_output=True).returncode != 0, reason="shallow clone")
def test_the_base_side_really_runs_the_revisions_kernels():
    # that revision rounds its decays differently: results differ at float32 rounding level, not 0
    proc = run("--base", BEFORE_DECAY_CHANGE, "--rounds", "1", "--ops", "scan_fwd", "--shape", "1", "64", "300", "8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    difference = float(proc.stdout.splitlines()[1].rsplit(" ", 1)[1])
    assert 0 < difference < 1e-4
