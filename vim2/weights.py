"""Pretrained-weight handling for the ViM2 family.

There are no published ViM2 weights yet. This module makes the failure to obtain weights explicit
(:func:`pretrained_errors_explained`) and holds the export / conversion pipeline that turns a trained
model or a training checkpoint into a directory ready for a model hub.
"""
from __future__ import annotations

import contextlib
import types
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

__all__ = [
    "PretrainedWeightsError",
    "pretrained_errors_explained",
    "describe_state_dict_mismatch",
]

# Tried-source keys of a timm pretrained cfg, in timm's own priority order.
_SOURCE_KEYS = ("state_dict", "file", "hf_hub_id", "url")

HOW_TO_PASS_LOCAL_WEIGHTS = (
    "To load your own weights use one of:\n"
    "  timm.create_model('{name}', pretrained=True, pretrained_cfg_overlay=dict(file='path/to/model.safetensors'))\n"
    "  timm.create_model('local-dir:path/to/exported_dir', pretrained=True)   # a `vim2-export` directory\n"
    "  timm.create_model('hf-hub:<user>/<repo>', pretrained=True)             # a published hub repo\n"
    "or create the model with pretrained=False for random initialisation."
)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights for a vim2 model could not be obtained, verified or loaded."""


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
        shown = items[:max_keys]
        more = f" ... and {len(items) - max_keys} more" if len(items) > max_keys else ""
        return f"  {title} ({len(items)}): " + ", ".join(shown) + more

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
    and the loaded state dict, which makes the error message precise.
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
    for key in _SOURCE_KEYS:
        value = cfg.get(key)
        if value:
            if key == "state_dict":
                return "an in-memory state_dict"
            if key == "hf_hub_id" and cfg.get("hf_hub_filename"):
                return f"hf_hub_id={value!r} (file {cfg['hf_hub_filename']!r})"
            return f"{key}={value!r}"
    return "no weight source (the pretrained cfg has no url, hf_hub_id or file)"


def _registered_cfg_has_weights(variant: str) -> bool:
    """Whether the registry's default pretrained cfg for ``variant`` names any weight source."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(variant)
    except Exception:  # unknown variant or tag: nothing is published for it
        return False
    return bool(cfg is not None and (cfg.url or cfg.hf_hub_id or cfg.file))


def _classify_failure(exc: BaseException, frame: Optional[Dict[str, Any]]) -> str:
    """One sentence saying why loading failed, from the exception type/message and timm's frame."""
    import pickle
    import urllib.error

    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    lowered = str(exc).lower()
    if isinstance(exc, RuntimeError) and "no pretrained weights exist" in lowered:
        return "no weight source is configured for this model"
    if "invalid hash value" in lowered or "checksum" in lowered or "sha256" in lowered:
        return f"the downloaded file failed its checksum verification ({text})"
    if isinstance(exc, FileNotFoundError):
        return "the weight file was not found" + (f" ({text})" if str(exc) else "")
    try:
        from huggingface_hub import errors as hf_errors

        hub_errors: Tuple[type, ...] = (
            hf_errors.OfflineModeIsEnabled,
            hf_errors.LocalEntryNotFoundError,
            hf_errors.RepositoryNotFoundError,
            hf_errors.EntryNotFoundError,
            hf_errors.HfHubHTTPError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        hub_errors = ()
    if hub_errors and isinstance(exc, hub_errors):
        return f"the Hugging Face hub could not provide the file (offline, missing repo or file) ({text})"
    if isinstance(exc, (urllib.error.URLError, ConnectionError, TimeoutError)):
        return f"the download failed (offline or the server is unreachable) ({text})"
    if "error(s) in loading state_dict" in lowered or "size mismatch" in lowered:
        detail = ""
        if frame is not None and "model" in frame and isinstance(frame.get("state_dict"), Mapping):
            detail = describe_state_dict_mismatch(frame["model"].state_dict(), frame["state_dict"])
        return (
            "the checkpoint does not match this architecture (wrong variant or not a ViM2 checkpoint)"
            + (":\n" + detail if detail else f" ({text})")
        )
    is_corrupt = isinstance(exc, (pickle.UnpicklingError, EOFError)) or any(
        s in lowered
        for s in ("safetensor", "header", "pytorchstreamreader", "invalid load key", "unpickl", "zip archive",
                  "incomplete", "truncated", "deserializ")
    )
    if is_corrupt:
        return f"the weight file is corrupted, truncated or not a checkpoint ({text})"
    return f"loading failed ({text})"


@contextlib.contextmanager
def pretrained_errors_explained(
    variant: str,
    pretrained: bool,
    pretrained_cfg: Optional[Any] = None,
    pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
) -> Iterator[None]:
    """Re-raise failures to obtain or load pretrained weights as a :class:`PretrainedWeightsError`.

    Wrap it around ``timm.models.build_model_with_cfg(...)`` in a model factory::

        with pretrained_errors_explained(variant, pretrained):
            model = build_model_with_cfg(Vim2, variant, pretrained, **kwargs)

    Only exceptions raised while timm obtains/loads the weights are translated (no source
    configured, offline / HTTP / hub errors, missing file, checksum mismatch, corrupted file,
    key or shape mismatch); errors while constructing the model pass through unchanged, and
    with ``pretrained=False`` the manager does nothing.

    Args:
        variant: registered model name (``vim2_tiny``...), used in the message.
        pretrained: the factory's ``pretrained`` flag.
        pretrained_cfg: optional, the ``pretrained_cfg`` the factory passes on (improves the message).
        pretrained_cfg_overlay: optional, the overlay the factory passes on (improves the message).
    """
    if not pretrained:
        yield
        return
    try:
        yield
    except PretrainedWeightsError:
        raise
    except Exception as exc:
        frame = _load_pretrained_frame_locals(exc.__traceback__)
        if frame is None:
            raise  # not a weight-loading failure: model construction or feature wrapping
        raise _explained_error(variant, exc, frame, pretrained_cfg, pretrained_cfg_overlay) from exc


def _explained_error(
    variant: str,
    exc: BaseException,
    frame: Optional[Dict[str, Any]],
    pretrained_cfg: Optional[Any] = None,
    pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None,
) -> PretrainedWeightsError:
    tried = None
    if frame is not None and frame.get("load_from"):
        load_from, loc = frame["load_from"], frame.get("pretrained_loc")
        tried = "an in-memory state_dict" if load_from == "state_dict" else f"{load_from} {loc!r}"
    if tried is None:
        cfg: Dict[str, Any] = {}
        if frame is not None and isinstance(frame.get("pretrained_cfg"), Mapping):
            cfg.update(frame["pretrained_cfg"])
        elif isinstance(pretrained_cfg, Mapping):
            cfg.update(pretrained_cfg)
        cfg.update(pretrained_cfg_overlay or {})
        tried = _describe_cfg_source(cfg)
    reason = _classify_failure(exc, frame)
    base = variant.split(".")[0]
    published = (
        f"Official ViM2 weights are not published yet: '{variant}' has no download source."
        if not _registered_cfg_has_weights(variant)
        else f"The registry lists a weight source for '{variant}'."
    )
    message = (
        f"Could not load pretrained weights for '{variant}'.\n"
        f"Tried: {tried}.\n"
        f"Reason: {reason}.\n"
        f"{published}\n"
        + HOW_TO_PASS_LOCAL_WEIGHTS.format(name=base)
    )
    return PretrainedWeightsError(message)
