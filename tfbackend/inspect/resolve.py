"""Resolve what the user typed (a folder, a config.json, or a hub id) into a local config file.

Only `config.json` (and, when present, small JSON index files) is ever fetched: never weights.
Everything that talks to the hub goes through `huggingface_hub`.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from tfbackend.errors import SourceError
from tfbackend.inspect.facts import SourceInfo

CONFIG_NAME = "config.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or os.sep in model.strip("/").split("/", 1)[0]
        or (model.count("/") > 1)
    )


def resolve(
    model: str,
    *,
    revision: str | None = None,
    token: str | None = None,
    offline: bool | None = None,
) -> SourceInfo:
    """Find the model's config.json on disk, downloading only that file for a hub id."""
    path = Path(model).expanduser()
    if path.exists():
        return _resolve_local(model, path)
    if _looks_like_path(model) or not _REPO_ID.match(model):
        raise SourceError(
            f"no such file or folder: {model!r} (give a folder with config.json, a config.json "
            "path, or a hub id like 'org/name')"
        )
    return _resolve_hub(model, revision=revision, token=token, offline=offline)


def _resolve_local(model: str, path: Path) -> SourceInfo:
    if path.is_dir():
        config = path / CONFIG_NAME
        if not config.exists():
            raise SourceError(f"{path} has no {CONFIG_NAME}: point at the model's folder")
        local_dir = path
    else:
        if path.suffix != ".json":
            raise SourceError(f"{path} is not a folder or a config .json file")
        config, local_dir = path, path.parent
    return SourceInfo(
        kind="local",
        location=model,
        config_path=str(config.resolve()),
        local_dir=str(local_dir.resolve()),
    )


def _resolve_hub(
    repo_id: str, *, revision: str | None, token: str | None, offline: bool | None
) -> SourceInfo:
    # huggingface_hub reads HF_HUB_OFFLINE at import time; the flag must be set before.
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub

    token = token or os.environ.get("HF_TOKEN") or None
    with hub_errors(repo_id, revision):
        config = huggingface_hub.hf_hub_download(
            repo_id, CONFIG_NAME, revision=revision, token=token
        )
    return SourceInfo(
        kind="hub",
        location=repo_id,
        config_path=config,
        repo_id=repo_id,
        revision=revision,
        local_dir=str(Path(config).parent),
    )


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, what: str = CONFIG_NAME):
    """huggingface_hub's exceptions → one-line SourceErrors that say what to do."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except hf_errors.GatedRepoError as exc:
        raise SourceError(
            f"{repo_id} is gated: accept its licence on the hub, then pass --token or set HF_TOKEN"
        ) from exc
    except hf_errors.RepositoryNotFoundError as exc:
        raise SourceError(
            f"repository {repo_id!r} not found (or private): check the id, or pass --token"
        ) from exc
    except hf_errors.RevisionNotFoundError as exc:
        raise SourceError(f"revision {revision!r} not found in {repo_id}") from exc
    except hf_errors.LocalEntryNotFoundError as exc:
        raise SourceError(
            f"{repo_id} is not in the local cache and the hub cannot be reached (offline or no "
            "network): connect, or download it first with `hf download`"
        ) from exc
    except hf_errors.EntryNotFoundError as exc:
        raise SourceError(f"{repo_id} has no {what} at that revision") from exc
    except (hf_errors.OfflineModeIsEnabled, OSError) as exc:
        raise SourceError(
            f"cannot reach the hub for {repo_id} ({type(exc).__name__}): check the network or "
            "use a local folder"
        ) from exc
    except hf_errors.HfHubHTTPError as exc:
        raise SourceError(f"the hub refused {repo_id}: {str(exc).splitlines()[0]}") from exc
