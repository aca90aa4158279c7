"""Weight pipeline: export, conversion, loading (HTTP, local dir, file, hub cache), checksums, errors."""
import argparse
import datetime
import functools
import http.server
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import timm
import vim2.models  # noqa: F401  registers the ViM2 family
from vim2.weights import (
    ChecksumMismatchError,
    CheckpointMismatchError,
    PretrainedWeightsError,
    convert_checkpoint,
    convert_main,
    export_main,
    export_model,
    match_state_dict_to_model,
    pretrained_errors_explained,
    read_checkpoint,
    sha256_of_file,
    verify_export_dir,
)

MODEL = "test_vim2"
NUM_CLASSES = 5
IMG = 32


def _make_model(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=NUM_CLASSES, **kwargs).eval()
    with torch.no_grad():  # move every tensor off its init value so a silent partial load would show
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.01 * torch.randn_like(tensor))
    return model


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def sample():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def source_model():
    return _make_model()


@pytest.fixture(scope="module")
def reference(source_model, sample):
    return _outputs(source_model, sample)


@pytest.fixture(scope="module")
def export_dir(source_model, tmp_path_factory):
    return export_model(
        source_model, tmp_path_factory.mktemp("export") / "test_vim2-export",
        label_names=[f"class{i}" for i in range(NUM_CLASSES)], source="unit test", metrics={"val_top1": 12.5},
        hashed_copy=True,
    )


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def http_root(tmp_path):
    """(directory served, base URL) of a real HTTP server on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _hashed_name(export_dir: Path) -> str:
    return next(p.name for p in export_dir.glob("test_vim2-*.safetensors"))


# ----------------------------------------------------------------------------------------------
# The context manager and the "no weights published" case
# ----------------------------------------------------------------------------------------------

def test_no_published_weights_error_says_so_and_how_to_load_a_file():
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(MODEL, pretrained=True)
    message = str(info.value)
    assert "not published" in message
    assert "no weight source" in message
    assert "pretrained_cfg_overlay=dict(file=" in message
    assert "local-dir:" in message and "hf-hub:" in message
    assert isinstance(info.value, RuntimeError)


def test_pretrained_false_does_nothing():
    with pytest.raises(KeyError):
        with pretrained_errors_explained(MODEL, False, pretrained_cfg_overlay=dict(file="/nonexistent.safetensors")):
            raise KeyError("passes through untouched")
    model = timm.create_model(MODEL, pretrained=False, num_classes=3)
    assert model.num_classes == 3


def test_model_construction_errors_are_not_rewritten():
    with pytest.raises(TypeError):
        timm.create_model(MODEL, pretrained=True, not_an_argument=1)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------

def test_export_directory_is_hub_ready_and_records_checksums(export_dir, source_model):
    names = {p.name for p in export_dir.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= names
    config = json.loads((export_dir / "config.json").read_text())
    assert config["architecture"] == MODEL
    assert config["num_classes"] == NUM_CLASSES
    assert config["label_names"] == [f"class{i}" for i in range(NUM_CLASSES)]
    assert config["pretrained_cfg"]["classifier"] == "head.fc"
    sha = sha256_of_file(export_dir / "model.safetensors")
    assert config["vim2"]["files"]["model.safetensors"]["sha256"] == sha
    hashed = _hashed_name(export_dir)
    assert hashed == f"{MODEL}-{sha[:10]}.safetensors"
    assert verify_export_dir(export_dir) == {"model.safetensors": sha, hashed: sha}
    assert "NOT official" in (export_dir / "README.md").read_text()


def test_export_serialisation_is_deterministic(source_model, export_dir, tmp_path):
    again = export_model(source_model, tmp_path / "again")
    assert sha256_of_file(again / "model.safetensors") == sha256_of_file(export_dir / "model.safetensors")


# ----------------------------------------------------------------------------------------------
# Loading: local dir, file, HTTP URL, hub cache
# ----------------------------------------------------------------------------------------------

def test_local_dir_roundtrip(export_dir, sample, reference):
    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    assert model.num_classes == NUM_CLASSES
    assert torch.equal(_outputs(model, sample), reference)


def test_file_overlay_roundtrip(export_dir, sample, reference):
    # the overlay states the file's class count too: otherwise timm treats the head as the registry's
    # 1000-class one, drops it and leaves the new head randomly initialised
    model = timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, pretrained_cfg_overlay=dict(
        file=str(export_dir / "model.safetensors"), num_classes=NUM_CLASSES))
    assert torch.equal(_outputs(model, sample), reference)


def test_url_over_http_with_hash_prefix(export_dir, http_root, tmp_path, sample, reference):
    root, base = http_root
    hashed = _hashed_name(export_dir)
    shutil.copy(export_dir / hashed, root / hashed)
    cache = tmp_path / "cache"
    model = timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, cache_dir=str(cache),
                              pretrained_cfg_overlay=dict(url=f"{base}/{hashed}", num_classes=NUM_CLASSES))
    assert torch.equal(_outputs(model, sample), reference)
    assert (cache / hashed).is_file()

    # a cached copy that got corrupted later is caught (torch.hub alone would reuse it unchecked)
    data = (cache / hashed).read_bytes()
    (cache / hashed).write_bytes(data[:-16] + bytes(16))
    with pytest.raises(PretrainedWeightsError, match="checksum") as info:
        timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, cache_dir=str(cache),
                          pretrained_cfg_overlay=dict(url=f"{base}/{hashed}", num_classes=NUM_CLASSES))
    assert isinstance(info.value.__cause__, ChecksumMismatchError)


def test_url_over_http_plain_safetensors_name(export_dir, http_root, tmp_path, sample, reference):
    root, base = http_root
    shutil.copy(export_dir / "model.safetensors", root / "model.safetensors")
    model = timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, cache_dir=str(tmp_path / "c"),
                              pretrained_cfg_overlay=dict(url=f"{base}/model.safetensors", num_classes=NUM_CLASSES))
    assert torch.equal(_outputs(model, sample), reference)


def test_url_checksum_mismatch_is_rejected_and_not_cached(export_dir, http_root, tmp_path):
    root, base = http_root
    wrong = f"{MODEL}-0123456789.safetensors"
    shutil.copy(export_dir / "model.safetensors", root / wrong)
    cache = tmp_path / "cache"
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, cache_dir=str(cache),
                          pretrained_cfg_overlay=dict(url=f"{base}/{wrong}"))
    message = str(info.value)
    assert "checksum" in message and "0123456789" in message and f"{base}/{wrong}" in message
    assert not any(cache.iterdir()), "a file that failed verification must not stay in the cache"


def test_unreachable_or_missing_url_is_explained(http_root, tmp_path):
    _, base = http_root
    with pytest.raises(PretrainedWeightsError, match="download failed") as info:
        timm.create_model(MODEL, pretrained=True, cache_dir=str(tmp_path),
                          pretrained_cfg_overlay=dict(url=f"{base}/missing.safetensors"))
    assert "not published" in str(info.value)


def test_missing_file_is_explained(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(PretrainedWeightsError, match="not found") as info:
        timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    assert str(missing) in str(info.value)


def test_truncated_file_is_explained(export_dir, tmp_path):
    broken = tmp_path / "broken.safetensors"  # no config.json beside it: no recorded checksum
    broken.write_bytes((export_dir / "model.safetensors").read_bytes()[:200])
    with pytest.raises(PretrainedWeightsError, match="corrupted, truncated"):
        timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES,
                          pretrained_cfg_overlay=dict(file=str(broken), num_classes=NUM_CLASSES))


def test_local_dir_corruption_fails_checksum(export_dir, tmp_path):
    copy = Path(shutil.copytree(export_dir, tmp_path / "copy"))
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte: only a checksum notices
    weights.write_bytes(bytes(data))
    with pytest.raises(PretrainedWeightsError, match="checksum") as info:
        timm.create_model(f"local-dir:{copy}", pretrained=True)
    assert "sha256" in str(info.value)
    with pytest.raises(ChecksumMismatchError):
        verify_export_dir(copy)


def test_wrong_architecture_names_the_mismatched_keys(export_dir):
    with pytest.raises(PretrainedWeightsError) as info:
        timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, embed_dims=(8, 16, 32, 64),
                          pretrained_cfg_overlay=dict(file=str(export_dir / "model.safetensors"), num_classes=NUM_CLASSES))
    message = str(info.value)
    assert "does not match this architecture" in message
    assert "shape mismatches" in message and "stem.conv.weight" in message


def _fake_hub_cache(cache: Path, repo_id: str, files: dict) -> Path:
    """The on-disk layout huggingface_hub reads in offline mode (refs/main -> snapshots/<commit>/)."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        shutil.copy(src, snapshot / name)
    return snapshot


def test_hf_hub_offline_from_local_cache(export_dir, tmp_path, monkeypatch, sample, reference):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "local/vim2-test", {
        "config.json": export_dir / "config.json", "model.safetensors": export_dir / "model.safetensors"})
    model = timm.create_model("hf-hub:local/vim2-test", pretrained=True, cache_dir=str(cache))
    assert torch.equal(_outputs(model, sample), reference)

    # a repo id in the pretrained cfg that the offline cache does not hold
    with pytest.raises(PretrainedWeightsError, match="hub could not provide"):
        timm.create_model(MODEL, pretrained=True, cache_dir=str(cache),
                          pretrained_cfg_overlay=dict(hf_hub_id="local/not-there"))

    # the cached weights no longer match the sha256 their config.json records
    data = bytearray((snapshot / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (snapshot / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(PretrainedWeightsError, match="checksum"):
        timm.create_model(MODEL, pretrained=True, num_classes=NUM_CLASSES, cache_dir=str(cache),
                          pretrained_cfg_overlay=dict(hf_hub_id="local/vim2-test", num_classes=NUM_CLASSES))


# ----------------------------------------------------------------------------------------------
# Conversion of training checkpoints
# ----------------------------------------------------------------------------------------------

def _prefixed(state_dict, prefix):
    return {prefix + k: v for k, v in state_dict.items()}


def _checkpoint_styles(state_dict):
    head = {k for k in state_dict if k.startswith("head.fc.")}
    backbone = {k: v for k, v in state_dict.items() if k not in head}
    return {
        "plain": (state_dict, NUM_CLASSES),
        "module_prefix": (_prefixed(state_dict, "module."), NUM_CLASSES),
        "model_prefix": (_prefixed(state_dict, "model."), NUM_CLASSES),
        "compiled_ddp": (_prefixed(state_dict, "module._orig_mod."), NUM_CLASSES),
        "timm_train": ({"arch": MODEL, "epoch": 3, "state_dict": state_dict, "optimizer": {},
                        "args": argparse.Namespace(lr=0.1), "version": 2}, NUM_CLASSES),
        "openmmlab": ({"meta": {"epoch": 12, "mmengine_version": "0.10"},
                       "state_dict": {**_prefixed(backbone, "backbone."),
                                      "decode_head.conv_seg.weight": torch.zeros(4, 8, 1, 1),
                                      "neck.lateral.0.weight": torch.zeros(8, 8)}}, 0),
    }


@pytest.mark.parametrize("style", ["plain", "module_prefix", "model_prefix", "compiled_ddp", "timm_train", "openmmlab"])
def test_convert_checkpoint_styles(style, source_model, tmp_path):
    state_dict = source_model.state_dict()
    checkpoint, num_classes = _checkpoint_styles(state_dict)[style]
    path = tmp_path / "ckpt.pth.tar"
    torch.save(checkpoint, path)
    result = convert_checkpoint(path, MODEL)
    assert result.model.num_classes == num_classes
    converted = result.model.state_dict()
    for key, value in converted.items():
        assert torch.equal(value, state_dict[key]), key
    if style == "openmmlab":
        assert result.stripped_prefix == "backbone."
        assert sorted(result.dropped_keys) == ["decode_head.conv_seg.weight", "neck.lateral.0.weight"]
        assert any("no classifier" in n for n in result.notes)


def test_prefix_detection_prefers_the_prefix_naming_model_keys(source_model):
    state_dict = _prefixed(source_model.state_dict(), "backbone.model.")
    renamed, prefix, dropped = match_state_dict_to_model(state_dict, list(source_model.state_dict()))
    assert prefix == "backbone.model." and not dropped and set(renamed) == set(source_model.state_dict())


def test_convert_chooses_ema_by_flag(source_model, tmp_path):
    plain = source_model.state_dict()
    ema = {k: (v + 1 if v.is_floating_point() else v) for k, v in plain.items()}
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({"arch": MODEL, "state_dict": plain, "state_dict_ema": ema}, path)
    regular = convert_checkpoint(path)
    averaged = convert_checkpoint(path, ema=True)
    key = "stem.conv.weight"
    assert torch.equal(regular.model.state_dict()[key], plain[key])
    assert torch.equal(averaged.model.state_dict()[key], ema[key])
    assert any("EMA" in n for n in regular.notes)
    torch.save({"arch": MODEL, "state_dict": plain}, path)
    with pytest.raises(ValueError, match="no EMA weights"):
        convert_checkpoint(path, ema=True)


def test_convert_mismatch_names_keys(source_model):
    state_dict = dict(source_model.state_dict())
    removed = "norm.weight" if "norm.weight" in state_dict else next(iter(state_dict))
    state_dict.pop(removed)
    state_dict["stem.conv.weight"] = torch.zeros(3, 3, 1, 1)
    state_dict["stages.9.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        convert_checkpoint({"state_dict": state_dict}, MODEL)
    message = str(info.value)
    assert removed in message and "stages.9.extra" in message and "stem.conv.weight" in message
    assert "missing keys" in message and "unexpected keys" in message and "shape mismatches" in message


def test_untrusted_pickle_needs_opt_in(source_model, tmp_path):
    path = tmp_path / "mm.pth"
    torch.save({"state_dict": source_model.state_dict(), "meta": {"time": datetime.datetime(2024, 1, 1)}}, path)
    with pytest.raises(ValueError, match="--trust-pickle"):
        read_checkpoint(path)
    assert "state_dict" in read_checkpoint(path, trust_pickle=True)


def test_cli_train_checkpoint_to_loadable_export(source_model, tmp_path, sample, reference, capsys):
    checkpoint = {
        "arch": MODEL, "model_kwargs": {}, "state_dict": source_model.state_dict(), "epoch": 2, "metric": 97.5,
        "label_names": [str(i) for i in range(NUM_CLASSES)], "dataset": "sklearn-digits",
        "data_config": {"input_size": (3, IMG, IMG), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                        "interpolation": "bicubic", "crop_pct": 1.0},
    }
    path = tmp_path / "last.pth.tar"
    torch.save(checkpoint, path)
    out = tmp_path / "exported"
    assert export_main([str(path), "-o", str(out)]) == 0
    assert "sha256" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [3, IMG, IMG]
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    assert config["vim2"]["metrics"] == {"val_top1": 97.5, "dataset": "sklearn-digits"}
    model = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert torch.equal(_outputs(model, sample), reference)


def test_cli_convert_reports_mismatch(source_model, tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save(_prefixed(source_model.state_dict(), "module."), path)
    assert convert_main([str(path), "-o", str(tmp_path / "out"), "--model", "vim2_tiny", "--num-classes", "5"]) == 2
    assert "shape mismatches" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_openmmlab_ema_state_dict(source_model):
    """mmengine's EMAHook stores `ema_state_dict` with `module.backbone.` keys and a `steps` counter."""
    plain = source_model.state_dict()
    ema = {k: (v * 2 if v.is_floating_point() else v) for k, v in plain.items() if not k.startswith("head.fc.")}
    checkpoint = {
        "meta": {"dataset_meta": {"classes": ["a", "b"]}},
        "state_dict": _prefixed({k: v for k, v in plain.items() if not k.startswith("head.fc.")}, "backbone."),
        "ema_state_dict": {"steps": torch.tensor(100), **_prefixed(ema, "module.backbone.")},
    }
    result = convert_checkpoint(checkpoint, MODEL, ema=True)
    assert result.stripped_prefix == "module.backbone." and result.dropped_keys == ["steps"]
    assert result.model.num_classes == 0
    assert torch.equal(result.model.state_dict()["stem.conv.weight"], ema["stem.conv.weight"])


def test_push_passes_the_verified_export_to_timms_push_helper(source_model, export_dir, tmp_path, monkeypatch):
    """Everything up to the upload (which needs network and a token): timm's helper receives the
    checksum record, and what it would serialise hashes to the recorded sha256."""
    import timm.models
    from vim2.weights import push_export_to_hub

    calls = {}

    def fake_push(model, repo_id, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        staged = tmp_path / "staged"
        timm.models.save_for_hf(model, str(staged), model_config=kwargs["model_config"],
                                safe_serialization=kwargs["safe_serialization"], data_config=kwargs["data_config"])
        return staged

    monkeypatch.setattr(timm.models, "push_to_hf_hub", fake_push)
    staged = push_export_to_hub(source_model, export_dir, "user/vim2-test")
    assert calls["repo_id"] == "user/vim2-test" and calls["safe_serialization"] is True
    config = json.loads((staged / "config.json").read_text())
    assert list(config["vim2"]["files"]) == ["model.safetensors"]
    assert config["vim2"]["files"]["model.safetensors"]["sha256"] == sha256_of_file(staged / "model.safetensors")
    assert config["label_names"] == [f"class{i}" for i in range(NUM_CLASSES)]

    with pytest.raises(ChecksumMismatchError):  # a different model than the one exported is refused
        push_export_to_hub(_make_model(seed=5), export_dir, "user/vim2-test")
