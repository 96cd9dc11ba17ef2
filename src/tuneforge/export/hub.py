"""Pushing exports to the Hugging Face Hub through `huggingface_hub`, with errors that say what to do.

An export is first written to a local folder (the same code as the save_* functions), then that
folder is uploaded; so a failed push never loses the export, and the error names where it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class HubUnavailable(RuntimeError):
    """The Hub cannot be reached (offline mode, no network) or refuses the token."""


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or flag.upper() in ("1", "ON", "YES", "TRUE")


def require_online(repo_id: str, saved_in: Path | None = None) -> None:
    """Raise HubUnavailable now when offline mode is on, before any export work is done."""
    if not _offline():
        return
    where = (f" The export is saved in {saved_in}; unset HF_HUB_OFFLINE and push it with "
             f"`hf upload {repo_id} {saved_in}`." if saved_in is not None else " Nothing was exported.")
    raise HubUnavailable(f"cannot push to {repo_id!r}: Hugging Face Hub offline mode is on (HF_HUB_OFFLINE).{where}")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures, whichever HTTP client this huggingface_hub uses (httpx2, httpx; requests'
    errors are OSErrors)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload with tuneforge", allow_patterns: list[str] | None = None) -> str:
    """Upload `folder` to the model repo `repo_id` (created if missing); returns the repo URL."""
    folder = Path(folder)
    require_online(repo_id, folder)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    token = token or os.environ.get("HF_TOKEN")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message, allow_patterns=allow_patterns)
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubUnavailable(f"the Hub refused the token for {repo_id!r} (HTTP {status}): pass token= or set "
                                 f"HF_TOKEN to a token with write access. The export is saved in {folder}") from error
        raise HubUnavailable(f"pushing {folder} to {repo_id!r} failed: {error}") from error
    except _transport_errors() as error:  # no route, refused, DNS, timeouts
        raise HubUnavailable(f"cannot reach the Hugging Face Hub to push {repo_id!r} ({type(error).__name__}: "
                             f"{error}). The export is saved in {folder}") from error
    log.info("pushed %s to %s", folder, url)
    return str(url)
