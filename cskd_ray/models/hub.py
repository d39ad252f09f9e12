"""Scoring models on the Hugging Face Hub: ``cskd-ray push`` and ``cskd_ray.load("hf-hub:org/name[@revision]")``.

A Hub repository holds one PyTorch model folder exactly as teacher / distill write it (``model.safetensors``
and ``model.json``, see :mod:`cskd_ray.models.saved`) plus a generated model card, ``README.md``
(:mod:`cskd_ray.models.model_card`). Loading ``hf-hub:org/name`` is loading that folder from the local
Hugging Face cache: :func:`huggingface_hub.snapshot_download` fills it when the Hub can be reached and
returns the cached snapshot otherwise, so ``HF_HUB_CACHE`` / ``HF_HOME`` and ``HF_HUB_OFFLINE=1`` work as
for any Hugging Face model. Offline and not cached, loading fails at once with a :class:`HubError`.

``huggingface_hub`` is imported only when a Hub model is loaded or pushed.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cskd_ray.io import storage
from cskd_ray.models.registry import WeightsUnavailableError, fetch_checkpoint, file_digest
from cskd_ray.models.saved import MODEL_JSON, WEIGHTS, describe_scoring_model, scoring_model_id

HUB_PREFIX = "hf-hub:"
CARD = "README.md"
HUB_FILES = (WEIGHTS, MODEL_JSON, CARD)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_COMMIT = re.compile(r"[0-9a-f]{40}")  # a git commit id, what the Hub names snapshot folders by


class HubError(WeightsUnavailableError):
    """A Hub model cannot be fetched or pushed; the message names the repository and why."""


@dataclass(frozen=True)
class HubModel:
    """A model repository on the Hub and an optional revision (branch, tag or commit; None: ``main``)."""

    repo_id: str
    revision: str | None = None

    @property
    def uri(self) -> str:
        """``hf-hub:org/name`` or ``hf-hub:org/name@revision``: what :func:`cskd_ray.load` takes."""
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_uri(model: str | os.PathLike) -> bool:
    """Whether ``model`` names a Hub model (``hf-hub:...``) rather than a folder."""
    return isinstance(model, str) and model.startswith(HUB_PREFIX)


def parse_hub_uri(uri: str) -> HubModel:
    """Split ``hf-hub:org/name[@revision]``.

    Raises:
        HubError: If the repository id is not ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``)
            or the revision after ``@`` is empty.
    """
    repo_id, sep, revision = uri.removeprefix(HUB_PREFIX).partition("@")
    if not _REPO_ID.match(repo_id) or (sep and not revision.strip()):
        raise HubError(f"{uri}: expected hf-hub:org/name or hf-hub:org/name@revision")
    return HubModel(repo_id, revision.strip() or None)


def download_model(uri: str) -> str:
    """The local folder of the Hub model ``uri``: its snapshot in the Hugging Face cache, downloaded if missing.

    Only the files a model folder holds (:data:`HUB_FILES`) are fetched.

    Raises:
        HubError: If the repository or revision does not exist or cannot be read, if it holds no cskd_ray
            model, or if the model is not cached and the Hub cannot be reached (``HF_HUB_OFFLINE=1``, no
            network): the message names the repository and the reason.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from cskd_ray._version import __version__

    hub = parse_hub_uri(uri)
    try:
        folder = snapshot_download(hub.repo_id, revision=hub.revision, allow_patterns=list(HUB_FILES),
                                   library_name="cskd_ray", library_version=__version__)
    except RevisionNotFoundError:
        raise HubError(f"{uri}: the repository {hub.repo_id} has no revision {hub.revision!r}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{uri}: no such model repository on the Hub, or it is private or gated and this machine "
                       "is not logged in with access to it (`hf auth login` or HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else "offline or unreachable"
        raise HubError(f"{uri}: the model is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                       f"the Hub cannot be reached ({why}); download it once with network access, or pass a local "
                       "model folder") from None
    except HfHubHTTPError as exc:
        raise HubError(f"{uri}: the Hub refused the download: {_first_line(exc)}") from None
    except (OSError, ValueError) as exc:
        raise HubError(f"{uri}: cannot download: {_first_line(exc)}") from None
    if not os.path.isfile(os.path.join(folder, MODEL_JSON)):
        raise HubError(f"{uri}: the repository holds no cskd_ray model (no {MODEL_JSON}); push one with "
                       "`cskd-ray push MODEL --repo ORG/NAME`")
    return folder


def pin_revision(uri: str) -> str:
    """``hf-hub:org/name@<commit>``: the commit of the snapshot :func:`download_model` gives.

    A job passes the pinned URI to its Ray workers, so all load the same files even if the branch moves. A URI
    already pinned to a full commit is returned as it is (the caller's next step, describing the model, fetches
    its files), so pinning twice costs no second Hub request.
    """
    model = parse_hub_uri(uri)
    if model.revision and _COMMIT.fullmatch(model.revision):
        return model.uri
    return HubModel(model.repo_id, Path(download_model(uri)).name).uri


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@dataclass(frozen=True)
class PushResult:
    """What ``cskd-ray push`` did: the folder written, and the Hub URL and commit unless only written locally."""

    folder: str
    model: HubModel
    model_id: str
    sha256: str
    url: str | None = None
    commit: str | None = None

    def summary(self) -> str:
        """The line ``cskd-ray push`` prints."""
        done = f"pushed to {self.folder} (commit {self.commit})" if self.url else f"written to {self.folder}"
        return (f"push: model {self.model_id} {done}; weights sha256 {self.sha256}; load it with "
                f'cskd_ray.load("{self.model.uri}")')


def write_hub_folder(model_dir: str, folder: str | os.PathLike, hub: HubModel, license: str = "unknown",
                     metrics: str | None = None) -> PushResult:
    """Write ``model.safetensors`` and ``model.json`` (copied unchanged) and the model card into ``folder``.

    Args:
        model_dir: A PyTorch model folder (teacher / distill ``output/model``), local or ``s3://``.
        folder: Local folder to write; created when missing; it may hold only the files written here.
        hub: The repository (and revision) the card tells users to load.
        license: The card's ``license`` (a Hub license id such as ``apache-2.0``, ``cc-by-nc-4.0``, ``other``).
        metrics: ``metrics.json`` written by ``cskd-ray evaluate`` for this model; None: looked for next to it
            (see :func:`cskd_ray.models.model_card.find_evaluation`).

    Raises:
        HubError: If ``model_dir`` is an export folder, or ``folder`` holds other files.
        WeightsUnavailableError: If ``model_dir`` is not a model folder.
    """
    from cskd_ray.models.model_card import find_evaluation, render_model_card

    description = describe_scoring_model(model_dir)
    if "format" in description:
        raise HubError(f"{model_dir}: an export folder ({description['format']}); push takes a PyTorch model folder "
                       "(teacher or distill output/model)")
    out = Path(folder)
    others = sorted(p.name for p in out.iterdir() if p.name not in HUB_FILES) if out.is_dir() else []
    if others or out.is_file():
        what = f"holds other files ({', '.join(others[:3])})" if others else "is a file"
        raise HubError(f"--local-dir {folder}: {what}; pass a new or empty folder")
    weights = fetch_checkpoint(storage.join(model_dir, WEIGHTS))
    sha256, model_id = file_digest(weights), scoring_model_id(model_dir, description)
    evaluation = find_evaluation(model_dir, model_id, metrics)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / WEIGHTS)
    (out / MODEL_JSON).write_bytes(storage.read_bytes(storage.join(model_dir, MODEL_JSON)))
    card = render_model_card(description, hub, model_id=model_id, sha256=sha256, size=os.path.getsize(weights),
                             license=license, evaluation=evaluation)
    (out / CARD).write_text(card, encoding="utf-8")
    return PushResult(str(out), hub, model_id, sha256)


def push_model(model_dir: str, repo_id: str, *, private: bool = False, revision: str | None = None,
               local_dir: str | None = None, license: str = "unknown", metrics: str | None = None) -> PushResult:
    """Publish a model folder on the Hub (``cskd-ray push``), or with ``local_dir`` only write the Hub folder.

    The repository is created when missing (``private`` applies then), and so is the branch ``revision``;
    the folder is uploaded as one commit. Credentials come from ``hf auth login`` or ``HF_TOKEN``.

    Raises:
        HubError: If the folder cannot be written or the upload fails (offline, not logged in, no write
            access); the message says which.
    """
    hub = parse_hub_uri(f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else ""))
    if local_dir is not None:
        return write_hub_folder(model_dir, local_dir, hub, license, metrics)
    with tempfile.TemporaryDirectory(prefix="cskd-ray-push-") as tmp:
        written = write_hub_folder(model_dir, tmp, hub, license, metrics)
        url, commit = _upload(tmp, hub, private, written.model_id)
    return PushResult(f"{url}/tree/{hub.revision or 'main'}", hub, written.model_id, written.sha256, url, commit)


def _upload(folder: str, hub: HubModel, private: bool, model_id: str) -> tuple[str, str]:
    """Create the repository (and branch) if needed and upload ``folder`` as one commit; returns (URL, commit)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    from cskd_ray._version import __version__

    api = HfApi(library_name="cskd_ray", library_version=__version__)
    try:
        url = api.create_repo(hub.repo_id, private=private, exist_ok=True)
        if hub.revision and hub.revision != "main":
            api.create_branch(hub.repo_id, branch=hub.revision, exist_ok=True)
        commit = api.upload_folder(repo_id=hub.repo_id, folder_path=folder, revision=hub.revision,
                                   commit_message=f"Upload cskd_ray model {model_id}")
    except OfflineModeIsEnabled:
        raise HubError(f"cannot push to {hub.repo_id}: HF_HUB_OFFLINE=1 is set; unset it, or only write the "
                       "folder with --local-dir") from None
    except LocalTokenNotFoundError:
        raise HubError(f"cannot push to {hub.repo_id}: not logged in; run `hf auth login` or set HF_TOKEN to a "
                       "token with write access") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code
        if status in (401, 403):
            raise HubError(f"cannot push to {hub.repo_id}: not logged in or no write access (HTTP {status}); run "
                           "`hf auth login` or set HF_TOKEN to a token with write access") from None
        raise HubError(f"cannot push to {hub.repo_id}: the Hub refused: {_first_line(exc)}") from None
    except OSError as exc:
        raise HubError(f"cannot push to {hub.repo_id}: the Hub cannot be reached: {_first_line(exc)}") from None
    return str(url).rstrip("/"), commit.oid
