"""Pushing exports to the Hugging Face Hub through `huggingface_hub`, with errors that say what to do.

`open_repo` runs first, before any merge or quantisation: offline mode, an unreachable Hub or a
refused token fail in seconds, saying nothing was exported. The export is then written to a
folder (the same code as the save_* functions) and uploaded. A failed upload of a folder the user
keeps names it; push_to_hub_* export into a temporary folder, deleted after the call, so their
errors say so and how to keep the export instead of naming a folder that no longer exists.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tuneforge import switches

log = logging.getLogger(__name__)


class HubUnavailable(RuntimeError):
    """The Hub cannot be reached (offline mode, no network) or refuses the token."""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or switches.offline()


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


_TEMPORARY = "temporary"


def _where(folder: Path | str | None, repo_id: str) -> str:
    if folder is None:
        return " Nothing was exported."
    if folder == _TEMPORARY:
        return (" The export was written to a temporary folder, deleted after the call: save it with "
                "save_pretrained_merged / save_pretrained_gguf, then push that folder with "
                f"`hf upload {repo_id} FOLDER`.")
    return f" The export is saved in {folder}."


def _hub_call(call, repo_id: str, folder: Path | None, what: str):
    """Run `call()` (a huggingface_hub request); its failures as HubUnavailable saying what to do."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return call()
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise HubUnavailable(f"the Hub refused the token for {repo_id!r} (HTTP {status}): pass token= or set "
                                 f"HF_TOKEN to a token with write access.{_where(folder, repo_id)}") from error
        raise HubUnavailable(f"{what} {repo_id!r} failed: {error}.{_where(folder, repo_id)}") from error
    except _transport_errors() as error:  # no route, refused, DNS, timeouts
        raise HubUnavailable(f"cannot reach the Hugging Face Hub to push {repo_id!r} ({type(error).__name__}: "
                             f"{error}).{_where(folder, repo_id)}") from error


def open_repo(repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Before exporting: offline mode, the network and the token are checked, and the model repo is
    created if missing (it needs a token with write access). Returns the repo URL."""
    require_online(repo_id)
    from huggingface_hub import HfApi

    api = HfApi(token=token or switches.hub_token())
    return str(_hub_call(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                         repo_id, None, "creating"))


def push_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False,
                commit_message: str = "Upload with tuneforge", allow_patterns: list[str] | None = None,
                temporary: bool = False) -> str:
    """Upload `folder` to the model repo `repo_id` (created if missing); returns the repo URL.

    temporary: the folder is deleted after this call (push_to_hub_*), so errors must not name it.
    """
    folder = Path(folder)
    where = _TEMPORARY if temporary else folder
    require_online(repo_id, None if temporary else folder)
    from huggingface_hub import HfApi

    api = HfApi(token=token or switches.hub_token())
    what = "uploading to" if temporary else f"pushing {folder} to"
    url = _hub_call(lambda: api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"),
                    repo_id, where, what)
    _hub_call(lambda: api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                        commit_message=commit_message, allow_patterns=allow_patterns),
              repo_id, where, what)
    log.info("pushed %s to %s", "the export" if temporary else folder, url)
    return str(url)
