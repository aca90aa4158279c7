"""Pretrained weights for the ViM2 family: loading errors, checksums, conversion and export.

No official ViM2 weights are published yet (see ``docs/weights.md``). This module

* explains failures to obtain/load weights (:func:`pretrained_errors_explained`, wrapped around
  ``timm.models.build_model_with_cfg`` by the vim2 model factory),
* verifies checksums before timm loads a file (sha256 recorded in an exported ``config.json``, or a
  torch.hub-style hash prefix in the file name: ``name-<8+ hex digits of sha256>.ext``),
* converts training checkpoints (timm ``train.py``, ``vim2-train``, plain state dicts, ``module.`` /
  ``model.`` wrappers, OpenMMLab ``backbone.`` checkpoints, EMA weights) into a validated state dict,
* exports a model as ``model.safetensors`` + timm's ``config.json`` (+ a model card) with timm's own
  ``save_for_hf`` / ``push_to_hf_hub``: a directory that ``timm.create_model('local-dir:DIR',
  pretrained=True)`` loads and that can be uploaded to a model hub as is.

Console scripts: ``vim2-export`` (:func:`export_main`) and ``vim2-convert`` (:func:`convert_main`).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = [
    "PretrainedWeightsError",
    "ChecksumMismatchError",
    "CheckpointMismatchError",
    "pretrained_errors_explained",
    "describe_state_dict_mismatch",
    "sha256_of_file",
    "expected_hash_from_filename",
    "recorded_sha256",
    "verify_export_dir",
    "read_checkpoint",
    "select_state_dict",
    "match_state_dict_to_model",
    "validate_state_dict",
    "ConversionResult",
    "convert_checkpoint",
    "export_model",
    "push_export_to_hub",
    "export_main",
    "convert_main",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
MODEL_CARD_NAME = "README.md"
# Top-level key of config.json holding vim2's export record (timm ignores unknown top-level keys).
RECORD_KEY = "vim2"
# torch.hub's convention: a file name carrying the first hex digits of its sha256 ("model-1a2b3c4d.pth").
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.")
# Weight file names timm's `local-dir:` loader tries first, in its order.
_LOCAL_DIR_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")

HOW_TO_PASS_LOCAL_WEIGHTS = (
    "To load your own weights use one of:\n"
    "  timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='path/to/model.safetensors'))\n"
    "  timm.create_model('local-dir:path/to/exported_dir', pretrained=True)   # a `vim2-export` directory\n"
    "  timm.create_model('hf-hub:<user>/<repo>', pretrained=True)             # a published hub repo\n"
    "or create the model with pretrained=False for random initialisation (docs/weights.md)."
)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights for a vim2 model could not be obtained, verified or loaded."""


class ChecksumMismatchError(PretrainedWeightsError):
    """A weight file's sha256 differs from the one recorded for it."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the target model (raised by conversion/export)."""


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------

def sha256_of_file(path: Union[str, Path], chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_hash_from_filename(name: str) -> Optional[str]:
    """The sha256 prefix a file name carries by torch.hub's convention (``name-<hex>.ext``), else None."""
    matches = _HASH_IN_NAME.findall(os.path.basename(name))
    return matches[-1] if matches else None


def recorded_sha256(config_path: Union[str, Path], filename: str) -> Optional[str]:
    """The sha256 that an exported ``config.json`` records for ``filename``; None if not recorded."""
    config_path = Path(config_path)
    if not config_path.is_file():
        return None
    with config_path.open("r", encoding="utf-8") as handle:
        config = json.load(handle)
    files = (config.get(RECORD_KEY) or {}).get("files") or {}
    entry = files.get(os.path.basename(filename))
    return entry.get("sha256") if isinstance(entry, Mapping) else None


def _verify_sha256(path: Union[str, Path], expected: str, where_recorded: str) -> None:
    actual = sha256_of_file(path)
    if not actual.startswith(expected.lower()):
        raise ChecksumMismatchError(
            f"{path} has sha256 {actual}, but {where_recorded} records {expected}: the file is corrupted, "
            "truncated or not the published one. Delete it and download/copy it again."
        )


def verify_export_dir(directory: Union[str, Path]) -> Dict[str, str]:
    """Check every file recorded in ``directory/config.json`` against its sha256.

    Returns:
        ``{filename: sha256}`` of the verified files.

    Raises:
        FileNotFoundError: no config.json, or a recorded file is absent.
        ValueError: config.json has no vim2 checksum record.
        ChecksumMismatchError: a file's content differs from its record.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory}: not an exported weights directory.")
    with config_path.open("r", encoding="utf-8") as handle:
        files = ((json.load(handle).get(RECORD_KEY) or {}).get("files")) or {}
    if not files:
        raise ValueError(f"{config_path} records no checksums (no '{RECORD_KEY}.files' entry).")
    verified = {}
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{config_path} records {name}, which is missing from {directory}.")
        _verify_sha256(path, entry["sha256"], str(config_path))
        verified[name] = entry["sha256"]
    return verified


# --------------------------------------------------------------------------------------------------
# Loading errors
# --------------------------------------------------------------------------------------------------

def describe_state_dict_mismatch(
    expected: Mapping[str, torch.Tensor],
    provided: Mapping[str, Any],
    max_keys: int = 10,
) -> str:
    """Name the missing, unexpected and shape-mismatched keys of ``provided`` against ``expected``.

    Args:
        expected: state dict of the target model (``model.state_dict()``).
        provided: state dict being loaded.
        max_keys: how many keys to list per category before eliding.

    Returns:
        A multi-line description, or ``''`` when keys and shapes agree.
    """
    missing = [k for k in expected if k not in provided]
    unexpected = [k for k in provided if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(provided[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in provided and hasattr(provided[k], "shape") and tuple(provided[k].shape) != tuple(expected[k].shape)
    ]

    def _fmt(title: str, items: List[str]) -> str:
        more = f" ... and {len(items) - max_keys} more" if len(items) > max_keys else ""
        return f"  {title} ({len(items)}): " + ", ".join(items[:max_keys]) + more

    lines = []
    if missing:
        lines.append(_fmt("missing keys", missing))
    if unexpected:
        lines.append(_fmt("unexpected keys", unexpected))
    if mismatched:
        lines.append(_fmt("shape mismatches", mismatched))
    return "\n".join(lines)


def _load_pretrained_frame_locals(tb: Optional[types.TracebackType]) -> Optional[Dict[str, Any]]:
    """Locals of timm's ``load_pretrained`` frame if the exception passed through it, else None.

    The frame tells which source was tried (``load_from``/``pretrained_loc``) and holds the model
    and the loaded state dict, which makes the message precise. It also tells weight-loading
    failures apart from model-construction errors, which must pass through unchanged.
    """
    found = None
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in ("load_pretrained", "load_custom_pretrained") and "timm" in code.co_filename:
            found = tb.tb_frame.f_locals
        tb = tb.tb_next
    return found


def _describe_cfg_source(cfg: Optional[Mapping[str, Any]]) -> str:
    if not cfg:
        return "no weight source"
    if cfg.get("source") == "local-dir":
        return f"local-dir {cfg.get('file')!r}"
    for key in ("state_dict", "file", "hf_hub_id", "url"):
        value = cfg.get(key)
        if value:
            if key == "state_dict":
                return "an in-memory state_dict"
            if key == "hf_hub_id" and cfg.get("hf_hub_filename"):
                return f"hf-hub {value!r} (file {cfg['hf_hub_filename']!r})"
            return f"{key.replace('hf_hub_id', 'hf-hub')} {value!r}"
    return "no weight source (the pretrained cfg has no url, hf_hub_id or file)"


def _registered_cfg_has_weights(variant: str) -> bool:
    """Whether the registry's default pretrained cfg for ``variant`` names any weight source."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(variant)
    except Exception:  # unknown variant or tag: nothing is published for it
        return False
    return bool(cfg is not None and (cfg.url or cfg.hf_hub_id or cfg.file))


def _hub_error_types() -> Tuple[type, ...]:
    try:
        from huggingface_hub import errors as hf_errors
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return ()
    return (
        hf_errors.OfflineModeIsEnabled,
        hf_errors.LocalEntryNotFoundError,
        hf_errors.RepositoryNotFoundError,
        hf_errors.EntryNotFoundError,
        hf_errors.HfHubHTTPError,
    )


def _classify_failure(exc: BaseException, frame: Optional[Mapping[str, Any]]) -> str:
    """One sentence saying why loading failed, from the exception and timm's frame."""
    import pickle
    import urllib.error

    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    lowered = str(exc).lower()
    if isinstance(exc, ChecksumMismatchError):
        return f"the file failed its checksum verification: {exc}"
    if isinstance(exc, RuntimeError) and "no pretrained weights exist" in lowered:
        return "no weight source is configured for this model"
    if "invalid hash value" in lowered:
        return f"the downloaded file failed its checksum verification ({text})"
    hub_errors = _hub_error_types()  # checked first: some subclass FileNotFoundError
    if hub_errors and isinstance(exc, hub_errors):
        return f"the Hugging Face hub could not provide the file (offline, unknown repo or missing file) ({text})"
    if isinstance(exc, FileNotFoundError):
        return "the weight file was not found" + (f" ({text})" if str(exc) else "")
    if isinstance(exc, RuntimeError) and "no suitable checkpoints found" in lowered:
        return f"the directory holds no weight file ({text})"
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return f"the download failed (offline, server unreachable or file missing on the server) ({text})"
    if "error(s) in loading state_dict" in lowered or "size mismatch" in lowered:
        detail = ""
        if frame is not None and isinstance(frame.get("model"), nn.Module) and isinstance(
            frame.get("state_dict"), Mapping
        ):
            detail = describe_state_dict_mismatch(frame["model"].state_dict(), frame["state_dict"])
        return "the checkpoint does not match this architecture (another variant, other num_classes, " \
               "or not a ViM2 checkpoint)" + (":\n" + detail if detail else f" ({text})")
    corrupt_markers = ("safetensor", "header", "pytorchstreamreader", "invalid load key", "unpickl",
                       "zip archive", "incomplete", "truncated", "deserializ", "corrupt")
    if isinstance(exc, (pickle.UnpicklingError, EOFError)) or any(m in lowered for m in corrupt_markers):
        return f"the weight file is corrupted, truncated or not a checkpoint ({text})"
    return f"loading failed ({text})"


def _make_error(variant: str, tried: str, reason: str) -> PretrainedWeightsError:
    base = variant.split(".")[0]
    published = (
        f"Official ViM2 weights are not published yet: the registry has no download source for '{variant}'."
        if not _registered_cfg_has_weights(variant)
        else f"The registry lists a weight source for '{variant}'."
    )
    return PretrainedWeightsError(
        f"Could not load pretrained weights for '{variant}'.\n"
        f"Tried: {tried}.\n"
        f"Reason: {reason}.\n"
        f"{published}\n" + HOW_TO_PASS_LOCAL_WEIGHTS.format(name=base)
    )


def _resolved_cfg(variant: str, build_kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    import timm.models

    cfg = timm.models.resolve_pretrained_cfg(
        variant,
        pretrained_cfg=build_kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=build_kwargs.get("pretrained_cfg_overlay"),
    )
    return cfg.to_dict()


def _verify_local_file(path: Union[str, Path]) -> None:
    """Verify a local weight file by its name's hash prefix or a sibling config.json record."""
    path = Path(path)
    if not path.is_file():
        return  # timm reports the missing file; it is explained afterwards
    expected = expected_hash_from_filename(path.name)
    if expected:
        _verify_sha256(path, expected, f"its file name ({path.name})")
        return
    expected = recorded_sha256(path.parent / CONFIG_NAME, path.name)
    if expected:
        _verify_sha256(path, expected, str(path.parent / CONFIG_NAME))


def _verify_url(url: str, cache_dir: Optional[Union[str, Path]]) -> None:
    """Download a hash-named URL into the cache timm reads from, verifying it (or the cached copy).

    timm downloads ``url`` sources with ``torch.hub.load_state_dict_from_url(model_dir=cache_dir)``,
    which reuses an existing cached file without looking at it; so the check runs here, first.
    """
    filename = os.path.basename(urlparse(url).path)
    expected = expected_hash_from_filename(filename)
    if not expected:
        return
    model_dir = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    cached = model_dir / filename
    if cached.is_file():
        _verify_sha256(cached, expected, f"its URL's file name ({filename})")
        return
    model_dir.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=filename + ".", suffix=".partial", dir=model_dir)
    os.close(fd)
    try:
        torch.hub.download_url_to_file(url, partial, hash_prefix=None, progress=False)
        _verify_sha256(partial, expected, f"its URL's file name ({filename})")
        os.replace(partial, cached)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _verify_hub(hf_hub_id: str, filename: Optional[str], cache_dir: Optional[Union[str, Path]]) -> None:
    """Verify a hub file against the sha256 its repo's config.json records (if any)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo_id, _, revision = hf_hub_id.partition("@")
    try:
        config_file = hf_hub_download(repo_id, CONFIG_NAME, revision=revision or None, cache_dir=cache_dir)
    except EntryNotFoundError:
        return  # a repo without timm config: nothing recorded to verify against
    filename = filename or WEIGHTS_NAME
    expected = recorded_sha256(config_file, filename)
    if expected:
        weight_file = hf_hub_download(repo_id, filename, revision=revision or None, cache_dir=cache_dir)
        _verify_sha256(weight_file, expected, f"{hf_hub_id}/{CONFIG_NAME}")


def verify_pretrained_source(variant: str, **build_kwargs: Any) -> str:
    """Verify the weight file that timm is about to load for ``variant`` where a checksum is given.

    Resolves the pretrained cfg like timm (``pretrained_cfg``, ``pretrained_cfg_overlay`` and
    ``cache_dir`` from the factory kwargs), then, by source:

    * ``local-dir:`` / ``hf-hub:`` / ``hf_hub_id``: the sha256 recorded in the export's config.json;
    * ``file``: a hash prefix in the file name, else a record in a config.json beside the file;
    * ``url``: a hash prefix in the URL's file name (downloaded here into timm's cache, then reused).

    Returns:
        A description of the source tried (for error messages).

    Raises:
        ChecksumMismatchError, or the download's own error (explained by the caller).
    """
    cfg = _resolved_cfg(variant, build_kwargs)
    tried = _describe_cfg_source(cfg)
    cache_dir = build_kwargs.get("cache_dir")
    source = cfg.get("source")
    if source == "local-dir":
        directory = Path(cfg.get("file") or "")
        for name in _LOCAL_DIR_WEIGHT_NAMES:
            if (directory / name).is_file():
                expected = recorded_sha256(directory / CONFIG_NAME, name)
                if expected:
                    _verify_sha256(directory / name, expected, str(directory / CONFIG_NAME))
                break
    elif source == "hf-hub" or (not cfg.get("state_dict") and not cfg.get("file") and cfg.get("hf_hub_id")):
        _verify_hub(cfg["hf_hub_id"], cfg.get("hf_hub_filename"), cache_dir)
    elif cfg.get("state_dict") is not None:
        pass
    elif cfg.get("file"):
        _verify_local_file(cfg["file"])
    elif cfg.get("url"):
        _verify_url(cfg["url"], cache_dir)
    return tried


@contextlib.contextmanager
def pretrained_errors_explained(
    variant: str,
    pretrained: bool,
    pretrained_cfg: Optional[Any] = None,
    pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
    **build_kwargs: Any,
) -> Iterator[None]:
    """Verify checksums, then re-raise weight-loading failures as a :class:`PretrainedWeightsError`.

    Wrap it around ``build_model_with_cfg`` in a model factory, passing the factory's kwargs so
    the weight source (and its checksum) is known before timm loads it::

        with pretrained_errors_explained(variant, pretrained, **kwargs):
            model = build_model_with_cfg(Vim2, variant, pretrained, **kwargs)

    (equivalently ``pretrained_errors_explained(variant, pretrained, kwargs.get('pretrained_cfg'),
    kwargs.get('pretrained_cfg_overlay'), cache_dir=kwargs.get('cache_dir'))``).

    Translated: no source configured, offline / HTTP / hub errors, missing file, checksum mismatch,
    corrupted file, key or shape mismatch. Errors while constructing the model pass through
    unchanged. With ``pretrained=False`` it does nothing.

    Args:
        variant: registered model name (``vim2_tiny``...).
        pretrained: the factory's ``pretrained`` flag.
        pretrained_cfg: the factory's ``pretrained_cfg`` kwarg (tag, dict or None).
        pretrained_cfg_overlay: the factory's ``pretrained_cfg_overlay`` kwarg.
        **build_kwargs: the other factory kwargs; ``cache_dir`` is read (where timm caches URL
            downloads), the rest ignored. Without the cfg arguments, checksums of overlay/local-dir
            sources cannot be verified beforehand, but failures are still explained.
    """
    if not pretrained:
        yield
        return
    build_kwargs = dict(build_kwargs, pretrained_cfg=pretrained_cfg, pretrained_cfg_overlay=pretrained_cfg_overlay)
    tried = None
    try:
        tried = verify_pretrained_source(variant, **build_kwargs)
    except Exception as exc:  # checksum mismatch or a failed download of the file to verify
        if tried is None:
            try:
                tried = _describe_cfg_source(_resolved_cfg(variant, build_kwargs))
            except Exception:
                tried = "the configured weight source"
        raise _make_error(variant, tried, _classify_failure(exc, None)) from exc
    try:
        yield
    except PretrainedWeightsError:
        raise
    except Exception as exc:
        frame = _load_pretrained_frame_locals(exc.__traceback__)
        if frame is None:
            raise  # not a weight-loading failure: model construction or feature wrapping
        if frame.get("load_from"):
            load_from, loc = frame["load_from"], frame.get("pretrained_loc")
            tried = "an in-memory state_dict" if load_from == "state_dict" else f"{load_from} {loc!r}"
        elif tried is None:
            tried = _describe_cfg_source(frame.get("pretrained_cfg"))
        raise _make_error(variant, tried, _classify_failure(exc, frame)) from exc


# --------------------------------------------------------------------------------------------------
# Checkpoint conversion
# --------------------------------------------------------------------------------------------------

# Where checkpoint formats keep the model weights, in the order they are looked up.
_STATE_DICT_KEYS = ("state_dict", "model", "module", "net", "params")
# Where they keep EMA weights: timm train.py, common custom loops, OpenMMLab EMAHook.
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")


def read_checkpoint(path: Union[str, Path], trust_pickle: bool = False) -> Mapping[str, Any]:
    """Read a ``.safetensors`` file or a torch checkpoint (``.pth``, ``.pth.tar``, ``.bin``...).

    Torch files are read with ``weights_only=True`` (``argparse.Namespace`` allowed, as timm's
    train.py stores one); a checkpoint that needs arbitrary pickled objects (e.g. OpenMMLab's
    message hub) needs ``trust_pickle=True``, which may run code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    if path.suffix == ".safetensors":
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    # timm's train.py stores its argparse.Namespace; allow just that (torch < 2.5 lacks safe_globals)
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allow = safe_globals([argparse.Namespace]) if safe_globals is not None else contextlib.nullcontext()
    try:
        with allow:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ValueError(
                f"checkpoint {path} holds pickled Python objects that torch refuses to load with "
                "weights_only=True. If you trust the file, pass trust_pickle=True (--trust-pickle)."
            ) from exc
        raise


def _is_tensor_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def select_state_dict(checkpoint: Mapping[str, Any], ema: bool = False) -> Tuple[Dict[str, torch.Tensor], str]:
    """Pick the model (or EMA) weights out of a checkpoint.

    Args:
        checkpoint: what :func:`read_checkpoint` returned.
        ema: take the EMA weights (``state_dict_ema``, ``model_ema``, ``ema_state_dict``, ``ema``);
            an error if the checkpoint has none.

    Returns:
        (state dict with tensor values only, description of where it came from).
    """
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint: expected a mapping, got {type(checkpoint).__name__}")
    if ema:
        for key in _EMA_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                tensors = {k: v for k, v in checkpoint[key].items() if isinstance(v, torch.Tensor)}
                return tensors, f"checkpoint[{key!r}] (EMA weights)"
        raise ValueError(
            f"ema=True but the checkpoint has no EMA weights (looked for {', '.join(_EMA_KEYS)}); "
            f"its top-level keys are: {', '.join(map(str, list(checkpoint)[:20]))}"
        )
    for key in _STATE_DICT_KEYS:
        if isinstance(checkpoint.get(key), Mapping):
            tensors = {k: v for k, v in checkpoint[key].items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors, f"checkpoint[{key!r}]"
    if _is_tensor_mapping(checkpoint):
        return dict(checkpoint), "a plain state dict"
    raise ValueError(
        f"no state dict found in the checkpoint (looked for {', '.join(_STATE_DICT_KEYS)} or a flat "
        f"tensor mapping); its top-level keys are: {', '.join(map(str, list(checkpoint)[:20]))}"
    )


def match_state_dict_to_model(
    state_dict: Mapping[str, torch.Tensor],
    model_keys: Sequence[str],
) -> Tuple[Dict[str, torch.Tensor], str, List[str]]:
    """Strip the wrapper prefix that makes the checkpoint's keys the model's keys.

    The prefix is found from the keys themselves (``module.`` of DDP, ``model.`` of wrappers,
    ``_orig_mod.`` of torch.compile, ``backbone.`` of OpenMMLab detectors/segmentors, or any
    chain of them): the one under which most checkpoint keys name a model key. Keys outside that
    prefix (an mm neck / decode head, EMA step counters) are dropped and reported.

    Returns:
        (renamed state dict, stripped prefix ('' if none), dropped keys).
    """
    expected = set(model_keys)
    votes: Dict[str, int] = {}
    for key in state_dict:
        parts = key.split(".")
        for cut in range(len(parts)):
            if ".".join(parts[cut:]) in expected:
                prefix = ".".join(parts[:cut]) + "." if cut else ""
                votes[prefix] = votes.get(prefix, 0) + 1
                break
    # most votes wins; on a tie the shorter prefix (fewer assumptions)
    prefix = max(votes, key=lambda p: (votes[p], -len(p))) if votes else ""
    renamed = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    dropped = [k for k in state_dict if not k.startswith(prefix)]
    return renamed, prefix, dropped


def validate_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointMismatchError` naming missing/unexpected/mis-shaped keys, if any."""
    problems = describe_state_dict_mismatch(model.state_dict(), state_dict)
    if problems:
        raise CheckpointMismatchError(
            f"{what} does not fit {type(model).__name__} "
            f"'{getattr(model, 'pretrained_cfg', {}).get('architecture', '?')}':\n{problems}"
        )


def _classifier_name(model: nn.Module) -> Optional[str]:
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        return None
    head = get_classifier()
    if not isinstance(head, nn.Module):
        return None
    for name, module in model.named_modules():
        if module is head and name:
            return name
    return None


@dataclass
class ConversionResult:
    """What :func:`convert_checkpoint` built, and how."""
    model: nn.Module
    model_name: str
    source: str
    stripped_prefix: str
    dropped_keys: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    metadata: Dict[str, Any] = field(default_factory=dict)


def convert_checkpoint(
    checkpoint: Union[str, Path, Mapping[str, Any]],
    model_name: Optional[str] = None,
    *,
    ema: bool = False,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    num_classes: Optional[int] = None,
    trust_pickle: bool = False,
) -> ConversionResult:
    """Turn a training checkpoint into a timm model holding its weights, validated strictly.

    Args:
        checkpoint: path or loaded checkpoint: a ``vim2-train`` / timm ``train.py`` checkpoint
            (``state_dict``, ``state_dict_ema``, ``arch``), a plain state dict (``.pth`` or
            ``.safetensors``), with ``module.`` / ``model.`` prefixes, or an OpenMMLab checkpoint
            (``state_dict`` with ``backbone.`` keys, ``meta``).
        model_name: registered timm name; default: the checkpoint's ``arch``.
        ema: use the EMA weights.
        model_kwargs: constructor kwargs; default: the checkpoint's ``model_kwargs`` (vim2-train).
        num_classes: classifier size; default: read from the checkpoint's classifier weight,
            0 (no head) when the checkpoint has none, e.g. a detection/segmentation backbone.
        trust_pickle: allow arbitrary pickled objects (see :func:`read_checkpoint`).

    Raises:
        CheckpointMismatchError: keys/shapes do not fit, with the offending keys named.
    """
    import timm

    where = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "the checkpoint"
    if isinstance(checkpoint, (str, Path)):
        checkpoint = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    state_dict, source = select_state_dict(checkpoint, ema=ema)
    notes = []
    if not ema and any(isinstance(checkpoint.get(k), Mapping) for k in _EMA_KEYS):
        notes.append("the checkpoint also holds EMA weights; pass ema=True (--ema) to export those instead")
    model_name = model_name or checkpoint.get("arch")
    if not model_name:
        raise ValueError("model_name: the checkpoint records no 'arch'; name the timm model (e.g. vim2_tiny)")
    kwargs = dict(checkpoint.get("model_kwargs") or {}) if model_kwargs is None else dict(model_kwargs)
    kwargs.pop("num_classes", None)

    probe = timm.create_model(model_name, pretrained=False, **kwargs)
    renamed, prefix, dropped = match_state_dict_to_model(state_dict, list(probe.state_dict()))
    classifier = _classifier_name(probe)
    head_weight = renamed.get(f"{classifier}.weight") if classifier else None
    if num_classes is None:
        num_classes = int(head_weight.shape[0]) if head_weight is not None else 0
        if head_weight is None:
            notes.append("the checkpoint has no classifier weights: exported without a head (num_classes=0)")
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    validate_state_dict(model, renamed, what=f"{where} ({source}, prefix {prefix or 'none'} stripped)")
    model.load_state_dict(renamed, strict=True)
    model.eval()

    metadata: Dict[str, Any] = {}
    for key in ("epoch", "metric", "data_config", "label_names", "dataset"):
        if checkpoint.get(key) is not None:
            metadata[key] = checkpoint[key]
    meta = checkpoint.get("meta")
    if isinstance(meta, Mapping):  # OpenMMLab: class names live in meta.dataset_meta.classes
        classes = (meta.get("dataset_meta") or {}).get("classes") if isinstance(meta.get("dataset_meta"), Mapping) else None
        if classes and num_classes == len(classes):
            metadata["label_names"] = list(classes)
    return ConversionResult(model, model_name, source, prefix, dropped, notes, metadata)


# --------------------------------------------------------------------------------------------------
# Export / publish
# --------------------------------------------------------------------------------------------------

def _model_card(architecture: str, record: Mapping[str, Any], metrics: Optional[Mapping[str, Any]]) -> str:
    lines = [
        "---",
        "library_name: timm",
        "license: apache-2.0",
        "tags: [image-classification, timm, vim2, mamba]",
        "---",
        f"# {architecture} (ViM2, Vision MambaMixer)",
        "",
        "Weights exported by the `vim2` package (`vim2-export` / `vim2-convert`). These are NOT official",
        "ViM2 weights from the paper's authors; see the source and metrics below for what they are.",
        "",
        f"- architecture: `{architecture}`",
        f"- source: {record.get('source') or 'an in-memory model'}",
        f"- `model.safetensors` sha256: `{record['files'][WEIGHTS_NAME]['sha256']}`",
    ]
    for key, value in (metrics or {}).items():
        lines.append(f"- {key}: {value}")
    lines += [
        "",
        "## Use",
        "```python",
        "import timm, vim2  # importing vim2 registers the ViM2 architectures with timm",
        "model = timm.create_model('hf-hub:<user>/<this repo>', pretrained=True)  # or 'local-dir:<this dir>'",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_model(
    model: nn.Module,
    output_dir: Union[str, Path],
    *,
    label_names: Optional[Sequence[str]] = None,
    data_config: Optional[Mapping[str, Any]] = None,
    source: Optional[str] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    hashed_copy: bool = False,
) -> Path:
    """Write ``model`` as a hub-ready directory with timm's ``save_for_hf``.

    Files: ``model.safetensors``, ``config.json`` (timm's, plus a top-level ``"vim2"`` record with
    the sha256 and size of every weight file), ``README.md`` (model card), and with
    ``hashed_copy`` ``<architecture>-<sha256[:10]>.safetensors`` for hosting at a plain URL
    (torch.hub verifies that name's hash prefix, and so does vim2 before timm loads it).

    Args:
        model: a timm model (created by ``timm.create_model``), in any mode; exported on CPU.
        output_dir: created if needed; existing export files are overwritten.
        label_names: class names, stored in config.json.
        data_config: preprocessing (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``).
        source: where the weights came from, recorded for provenance.
        metrics: e.g. ``{'val_top1': 98.1}``, written to the model card and the record.
        hashed_copy: also write the hash-named copy for URL hosting.

    Returns:
        The output directory.
    """
    import timm
    import timm.models

    if not hasattr(model, "pretrained_cfg"):
        raise TypeError("model: expected a timm model (from timm.create_model), it has no pretrained_cfg")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_config: Dict[str, Any] = {}
    if label_names:
        model_config["label_names"] = list(label_names)
    import inspect

    if "data_config" in inspect.signature(timm.models.save_for_hf).parameters:
        timm.models.save_for_hf(
            model, str(output_dir), model_config=model_config, safe_serialization=True,
            data_config=dict(data_config) if data_config else None,
        )
    else:  # older timm: the preprocessing has to be in the model's pretrained_cfg while saving
        original = model.pretrained_cfg
        model.pretrained_cfg = {**original, **{k: v for k, v in (data_config or {}).items()
                                               if k in ("input_size", "mean", "std", "interpolation", "crop_pct")}}
        try:
            timm.models.save_for_hf(model, str(output_dir), model_config=model_config, safe_serialization=True)
        finally:
            model.pretrained_cfg = original
    weights = output_dir / WEIGHTS_NAME
    sha = sha256_of_file(weights)
    files = {WEIGHTS_NAME: {"sha256": sha, "bytes": weights.stat().st_size}}
    config_path = output_dir / CONFIG_NAME
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if hashed_copy:
        hashed_name = f"{config['architecture']}-{sha[:10]}.safetensors"
        shutil.copyfile(weights, output_dir / hashed_name)
        files[hashed_name] = dict(files[WEIGHTS_NAME])
    from vim2 import __version__ as vim2_version

    record = {
        "files": files,
        "source": source,
        "metrics": dict(metrics) if metrics else None,
        "versions": {"vim2": vim2_version, "timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
    }
    config[RECORD_KEY] = {k: v for k, v in record.items() if v is not None}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (output_dir / MODEL_CARD_NAME).write_text(
        _model_card(config["architecture"], record, metrics), encoding="utf-8"
    )
    return output_dir


def push_export_to_hub(
    model: nn.Module,
    export_dir: Union[str, Path],
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Add ViM2 weights",
) -> Any:
    """Publish ``model`` with timm's ``push_to_hf_hub``, carrying the export's checksum record.

    ``export_dir`` must be the :func:`export_model` output of the same model: timm serialises the
    model again (safetensors output is deterministic, so the bytes and the recorded sha256 agree;
    this is checked before uploading). Needs network access and a hub token.
    """
    import tempfile as _tempfile

    import timm.models
    import safetensors.torch

    export_dir = Path(export_dir)
    config = json.loads((export_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    record = config.get(RECORD_KEY) or {}
    with _tempfile.TemporaryDirectory() as tmp:  # same serialisation as the upload, to compare bytes
        safetensors.torch.save_file(model.state_dict(), os.path.join(tmp, WEIGHTS_NAME))
        if sha256_of_file(os.path.join(tmp, WEIGHTS_NAME)) != record["files"][WEIGHTS_NAME]["sha256"]:
            raise ChecksumMismatchError(f"the model differs from the weights exported in {export_dir}")
    record = dict(record, files={WEIGHTS_NAME: record["files"][WEIGHTS_NAME]})  # no hashed copy on the hub
    model_config = {RECORD_KEY: record}
    if config.get("label_names"):
        model_config["label_names"] = config["label_names"]
    pretrained_cfg = config.get("pretrained_cfg", {})
    data_config = {k: pretrained_cfg[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")
                   if k in pretrained_cfg}
    return timm.models.push_to_hf_hub(
        model, repo_id, commit_message=commit_message, token=token, private=private,
        model_config=model_config, safe_serialization=True, data_config=data_config,
        model_card={"description": f"ViM2 weights exported by vim2 from {record.get('source')}."},
    )


# --------------------------------------------------------------------------------------------------
# Console scripts
# --------------------------------------------------------------------------------------------------

def _build_parser(prog: str, description: str, with_push: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("checkpoint", help="checkpoint file (.pth/.pth.tar/.bin/.safetensors)")
    parser.add_argument("-o", "--output", required=True, help="output directory (hub-ready)")
    parser.add_argument("-m", "--model", default=None,
                        help="timm model name (default: the checkpoint's 'arch')")
    parser.add_argument("--model-kwargs", default=None, type=json.loads,
                        help="JSON dict of constructor kwargs (default: the checkpoint's 'model_kwargs')")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classifier size (default: from the checkpoint; 0 when it has no head)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in the checkpoint (may run code from it)")
    parser.add_argument("--hashed-copy", action="store_true",
                        help="also write <arch>-<sha256[:10]>.safetensors for hosting at a plain URL")
    if with_push:
        parser.add_argument("--push-to-hub", metavar="REPO", default=None,
                            help="also upload to this Hugging Face hub repo (needs network and a token)")
        parser.add_argument("--private", action="store_true", help="create the hub repo as private")
    return parser


def _run_cli(prog: str, description: str, argv: Optional[Sequence[str]], with_push: bool) -> int:
    args = _build_parser(prog, description, with_push).parse_args(argv)
    import vim2.models  # noqa: F401  registers the ViM2 models with timm

    try:
        result = convert_checkpoint(
            args.checkpoint, args.model, ema=args.ema, model_kwargs=args.model_kwargs,
            num_classes=args.num_classes, trust_pickle=args.trust_pickle,
        )
    except (CheckpointMismatchError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    metrics = {}
    if result.metadata.get("metric") is not None:
        metrics["val_top1"] = result.metadata["metric"]
    if result.metadata.get("dataset"):
        metrics["dataset"] = result.metadata["dataset"]
    out = export_model(
        result.model, args.output, label_names=result.metadata.get("label_names"),
        data_config=result.metadata.get("data_config"), metrics=metrics or None,
        source=f"{os.path.basename(args.checkpoint)}: {result.source}", hashed_copy=args.hashed_copy,
    )
    print(f"{prog}: {result.model_name} from {args.checkpoint} ({result.source}"
          f"{', prefix ' + repr(result.stripped_prefix) + ' stripped' if result.stripped_prefix else ''})")
    if result.dropped_keys:
        shown = ", ".join(result.dropped_keys[:8]) + (" ..." if len(result.dropped_keys) > 8 else "")
        print(f"{prog}: ignored {len(result.dropped_keys)} keys outside the model: {shown}")
    for note in result.notes:
        print(f"{prog}: note: {note}")
    for name, sha in verify_export_dir(out).items():
        print(f"{prog}: wrote {out / name}  sha256 {sha}")
    print(f"{prog}: load it with timm.create_model('local-dir:{out}', pretrained=True) after `import vim2`")
    if with_push and args.push_to_hub:
        push_export_to_hub(result.model, out, args.push_to_hub, private=args.private)
        print(f"{prog}: pushed to https://huggingface.co/{args.push_to_hub}; load it with "
              f"timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return 0


def export_main(argv: Optional[Sequence[str]] = None) -> int:
    """``vim2-export``: a trained model (a ``vim2-train`` checkpoint) -> hub-ready directory [-> hub]."""
    return _run_cli(
        "vim2-export",
        "Export a trained ViM2 (a vim2-train checkpoint such as runs/<name>/best.pth.tar) as "
        "model.safetensors + timm config.json, ready for `local-dir:` loading or a model hub.",
        argv, with_push=True,
    )


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
    """``vim2-convert``: a foreign training checkpoint -> the export format (validated)."""
    return _run_cli(
        "vim2-convert",
        "Convert a training checkpoint (timm train.py with state_dict/state_dict_ema, plain state dict, "
        "module./model. prefixes, OpenMMLab backbone. checkpoints) into the vim2 export format.",
        argv, with_push=False,
    )
