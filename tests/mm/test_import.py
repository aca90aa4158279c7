"""vim2 without OpenMMLab, vim2.mm's ImportError, and registration with only one of mmdet/mmseg.

Missing libraries are simulated in a subprocess by putting ``None`` in ``sys.modules`` (Python
then raises ModuleNotFoundError for that name, as if it were not installed).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from mm_helpers import REPO_ROOT, missing_mm_packages

MM_MODULES = ("mmengine", "mmcv", "mmdet", "mmseg", "mmpretrain")


def run_python(code: str, blocked=()) -> subprocess.CompletedProcess:
    """Runs ``code`` in a fresh interpreter where the ``blocked`` top-level packages cannot import."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def last_json_line(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_vim2_does_not_need_or_import_openmmlab():
    result = run_python("""
        import json, sys
        import vim2, vim2.models, timm
        model = timm.create_model('test_vim2')
        print(json.dumps(sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in %r)))
    """ % (MM_MODULES,), blocked=MM_MODULES)
    assert last_json_line(result) == []


def test_import_vim2_mm_without_mmengine_names_package_and_install_command():
    result = run_python("""
        try:
            import vim2.mm
        except ImportError as err:
            print('IMPORT-ERROR:', err)
        else:
            print('imported')
    """, blocked=("mmengine",))
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout
    assert "IMPORT-ERROR:" in message
    assert "'mmengine'" in message
    assert "bash tools/setup_env.sh --mm" in message
    assert 'pip install "vim2[mm]"' in message


needs_mm = pytest.mark.skipif(bool(missing_mm_packages()),
                              reason=f"OpenMMLab stack not installed (missing: {missing_mm_packages()})")

BUILD_AND_REPORT = """
    import json, torch
    import vim2.mm
    registry = __import__(vim2.mm.REGISTERED_IN[0] + '.registry', fromlist=['MODELS']).MODELS
    backbone = registry.build(dict(type='ViM2', arch=dict(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1),
                                                          d_state=2)))
    shapes = [list(f.shape) for f in backbone(torch.randn(1, 3, 32, 32))]
    print(json.dumps(dict(registered=list(vim2.mm.REGISTERED_IN),
                          cls=type(backbone).__name__, shapes=shapes)))
"""


@needs_mm
@pytest.mark.parametrize("blocked, expected", [
    (("mmdet",), ["mmseg"]),
    (("mmseg",), ["mmdet"]),
])
def test_registers_into_each_installed_library(blocked, expected):
    report = last_json_line(run_python(BUILD_AND_REPORT, blocked=blocked))
    assert report["registered"] == expected
    assert report["cls"] == "ViM2Backbone"
    assert report["shapes"] == [[1, 8, 8, 8], [1, 16, 4, 4], [1, 32, 2, 2], [1, 64, 1, 1]]


@needs_mm
def test_both_registries_resolve_to_the_adapter_in_process():
    import mmdet.registry
    import mmseg.registry

    import vim2.mm

    assert vim2.mm.REGISTERED_IN == ("mmdet", "mmseg")
    assert mmdet.registry.MODELS.get("ViM2") is vim2.mm.ViM2Backbone
    assert mmseg.registry.MODELS.get("ViM2") is vim2.mm.ViM2Backbone
    # A second import pass (e.g. importlib.reload by a plugin loader) must not fail on the names.
    import importlib

    importlib.reload(vim2.mm)
    assert mmdet.registry.MODELS.get("ViM2") is vim2.mm.ViM2Backbone
