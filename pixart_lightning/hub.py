"""Load pretrained models from a local folder or the Hugging Face Hub, failing fast and clearly offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import huggingface_hub
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import get_session, validate_repo_id

T = TypeVar("T")

HUB_PROBE_TIMEOUT_S = 5.0
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotAvailableError(RuntimeError):
    """A pretrained model is neither a local folder nor in the cache, and the Hub cannot be reached."""


def is_offline() -> bool:
    """Whether the user asked for offline mode (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    # huggingface_hub reads these variables once at import; read them again so later changes count.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return huggingface_hub.is_offline_mode() or env.strip().upper() in _TRUE


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether one HEAD request to the Hub endpoint gets any answer (proxies and HF_ENDPOINT honoured)."""
    try:
        get_session().head(huggingface_hub.constants.ENDPOINT, timeout=timeout)
    except Exception:  # any transport failure (DNS, refused, timeout, proxy) means unreachable
        return False
    return True


def pipeline_subfolder(name_or_path: str | os.PathLike, component: str) -> str | None:
    """``component`` if the local folder is a diffusers pipeline holding that subfolder, else None."""
    root = Path(name_or_path).expanduser()
    if not (root / "config.json").is_file() and (root / component).is_dir():
        return component
    return None


def load_pretrained(loader: Callable[..., T], name_or_path: str | os.PathLike, what: str, **kwargs) -> T:
    """Call ``loader(name_or_path, **kwargs)`` (e.g. ``T5EncoderModel.from_pretrained``) with actionable errors.

    A local folder is loaded as is. A Hub id is loaded normally when the Hub answers; otherwise only
    from the local cache, and a miss raises :class:`ModelNotAvailableError` explaining how to supply
    the model as a folder. Without this, an unreachable Hub costs ~25 s of retries per file.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return loader(str(path), **kwargs)
    name = str(name_or_path)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"Cannot load the {what}: no such folder: {path}") from None

    reason = "HF_HUB_OFFLINE is set" if is_offline() else None
    if reason is None and not hub_reachable():
        reason = f"{huggingface_hub.constants.ENDPOINT} cannot be reached"
    if reason is None:
        return loader(name, **kwargs)
    try:
        return loader(name, **{**kwargs, "local_files_only": True})
    except OSError as err:
        raise ModelNotAvailableError(_offline_message(what, name, reason)) from err


def _offline_message(what: str, name: str, reason: str) -> str:
    """Explain which model is missing and how to provide it as a local folder."""
    folder = f"./models/{name.split('/')[-1]}"
    return (
        f"Cannot load the {what} '{name}': it is not a local folder, not in the Hugging Face cache, "
        f"and this machine appears to be offline ({reason}).\n"
        f"Download it on a machine with internet access:\n"
        f"    hf download {name} --local-dir {folder}\n"
        f"(`huggingface-cli download ...` with older huggingface_hub), copy that folder here, "
        f"and pass its path (e.g. {folder}) instead of '{name}'."
    )
