"""tools/count_params_flops.py: the scan stubs count what they should and the docs table is current."""
import importlib.util
from pathlib import Path

import pytest
import torch

import vim2_kernels
from vim2.layers import SelectiveChannelMixer, SelectiveTokenMixer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope='module')
def tool():
    spec = importlib.util.spec_from_file_location('count_params_flops', ROOT / 'tools' / 'count_params_flops.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scan_stubs_count_every_scan_and_restore_the_kernels(tool):
    real = vim2_kernels.cross_scan_2d, vim2_kernels.channel_mixer_scan
    token = SelectiveTokenMixer(8, d_state=4, routes=('row', 'col'))
    channel = SelectiveChannelMixer(8, 12, d_state=3)
    x = torch.randn(2, 5, 3, 8)
    with tool.counting_scans() as scans, torch.no_grad():
        assert token(x).shape == x.shape
        token_flops = scans.flops
        assert channel(x).shape == x.shape
    assert (vim2_kernels.cross_scan_2d, vim2_kernels.channel_mixer_scan) == real
    # token mixer: 2 routes over d_inner=16 channels, L = 15 tokens per image, N = 4
    assert token_flops == 2 * tool.scan_flops(2, 16, 15, 4) + 2 * 15 * 16
    tokens = 2 * 15
    conv = 2 * tokens * 12 * 2 * 4  # d_conv = 4 taps per direction
    expected_channel = 2 * tool.scan_flops(tokens, 1, 12, 3) + tokens * 12 * 4 + conv + 2 * tokens * 12 * 2 * 7
    assert scans.flops - token_flops == expected_channel


def test_docs_table_is_current(tool):
    doc = (ROOT / 'docs' / 'architecture.md').read_text()
    block = doc.split(tool.TABLE_START, 1)[1].split(tool.TABLE_END, 1)[0].strip()
    names = ['vim2_tiny', 'vim2_small', 'vim2_base', 'vim2_mlp', 'test_vim2']
    assert block == tool.markdown_table(names, 224), \
        'docs/architecture.md is stale: run python tools/count_params_flops.py --update-doc docs/architecture.md'
