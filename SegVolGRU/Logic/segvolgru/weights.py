"""Where the SegVol weights live on disk, and a verified download of the official release.

Resolution order for the weights file: a path given by the caller, then ``$SEGVOLGRU_WEIGHTS``, then the
user cache (``$SEGVOLGRU_CACHE`` or ``~/.cache/segvolgru``), where the official release is stored as
``<cache>/BAAI--SegVol/pytorch_model.bin`` next to its tokenizer and configuration files and a
``pytorch_model.bin.sha256`` record of the verified hash.

The download goes through ``huggingface_hub`` (its progress bars, proxies, token and mirror settings apply);
every file is checked against the digest the hub advertises for it before it is moved into the cache, so an
interrupted or tampered download is never picked up by a later load. ``huggingface_hub`` is imported only
when a download starts.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segvolgru.errors import WeightsError
from segvolgru.files import readable, write_text_atomic

OFFICIAL_REPO_ID = "BAAI/SegVol"
WEIGHTS_FILENAME = "pytorch_model.bin"
# The weights come last: once they are in the cache, the tokenizer and configuration beside them are too.
OFFICIAL_FILES = (
    "config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    WEIGHTS_FILENAME,
)
WEIGHTS_ENV = "SEGVOLGRU_WEIGHTS"
CACHE_ENV = "SEGVOLGRU_CACHE"
SHA256_SUFFIX = ".sha256"
CHUNK_BYTES = 8 * 1024 * 1024

_WEIGHT_NAMES_IN_DIRECTORY = ("pytorch_model.bin", "model.safetensors")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_GIT_SHA1_HEX = re.compile(r"[0-9a-f]{40}")

# (resolved path, size, mtime in ns, inode) -> sha256 hex, so that a file already hashed in this process
# is not read again until it changes on disk.
_verified_sha256: dict[tuple[str, int, int, int], str] = {}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding downloaded releases: ``cache_dir``, else ``$SEGVOLGRU_CACHE``, else
    ``~/.cache/segvolgru``. Nothing is created."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "segvolgru"


def official_weights_path(cache_dir: str | os.PathLike | None = None, repo_id: str = OFFICIAL_REPO_ID) -> Path:
    """Where the weights of ``repo_id`` are (or will be) stored in the cache: ``<root>/<org>--<name>/
    pytorch_model.bin``, whether or not the file exists."""
    return cache_root(cache_dir) / repo_id.replace("/", "--") / WEIGHTS_FILENAME


def resolve_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """The weights file to load, or None when none is configured or cached.

    ``explicit`` wins, then ``$SEGVOLGRU_WEIGHTS``, then the cached official release. Either of the first two
    may name a file or a directory holding ``pytorch_model.bin``, ``model.safetensors`` or a single ``*.pth``;
    naming something that does not exist raises WeightsError rather than silently falling back.
    """
    if explicit is not None:
        return _existing_weights(Path(explicit).expanduser(), "The weights path given")
    from_env = os.environ.get(WEIGHTS_ENV)
    if from_env:
        return _existing_weights(Path(from_env).expanduser(), f"${WEIGHTS_ENV}")
    cached = official_weights_path()
    return cached if cached.is_file() else None


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK_BYTES) -> str:
    """SHA-256 of a file's bytes as 64 lowercase hex digits, read ``chunk`` bytes at a time."""
    return _hash_file(Path(path), hashlib.sha256(), chunk)


def verify_weights(path: str | os.PathLike) -> str:
    """SHA-256 of the weights file at ``path``, checked against the ``<file>.sha256`` record beside it.

    Without a record the hash is only computed and returned. A file already hashed in this process and
    unchanged since (same size, modification time and inode) is not read again.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {path} does not exist; check the path or download the weights again.")
    actual = _cached_sha256(path)
    recorded = _read_sha256_record(path)
    if recorded is not None and recorded != actual:
        raise WeightsError(
            f"Weights file {path} is corrupted or replaced: its SHA-256 is {actual} but {_record_path(path)} "
            f"records {recorded}. Delete both files and download the weights again."
        )
    return actual


def download_official_weights(
    cache_dir: str | os.PathLike | None = None,
    repo_id: str = OFFICIAL_REPO_ID,
    revision: str | None = None,
    progress: bool = True,
    endpoint: str | None = None,
) -> Path:
    """Download the SegVol release (weights, tokenizer and configuration files) into the cache.

    All files are taken from the one commit that ``revision`` (default: the main branch) points to when the
    download starts. Each is checked against the digest the hub advertises (SHA-256 for the LFS weights, the
    git blob hash for the small files) before it replaces anything in the cache; files already there with the
    right digest are not downloaded again. A mismatch deletes the download and raises WeightsError, as does
    a hub that cannot be reached (the message says where to put a copy downloaded by hand).

    Returns the path of the verified weights file, with its hash recorded in ``pytorch_model.bin.sha256``.
    """
    import httpx2
    from huggingface_hub.errors import RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    weights_path = official_weights_path(cache_dir, repo_id)
    current = WEIGHTS_FILENAME
    try:
        commit, weights_etag = _hub_file_metadata(repo_id, WEIGHTS_FILENAME, revision, endpoint)
        for current in OFFICIAL_FILES:
            etag = weights_etag
            if current != WEIGHTS_FILENAME:
                etag = _hub_file_metadata(repo_id, current, commit, endpoint)[1]
            _fetch_verified(repo_id, current, commit, etag, weights_path.parent, progress, endpoint)
    except RepositoryNotFoundError as error:
        raise WeightsError(
            f"The hub has no repository {repo_id}, or it needs access rights; check the name, or log in "
            "with `hf auth login` if the repository is gated."
        ) from error
    except RevisionNotFoundError as error:
        raise WeightsError(
            f"Repository {repo_id} has no revision {revision!r}; give a branch, tag or commit that exists."
        ) from error
    except RemoteEntryNotFoundError as error:
        raise WeightsError(
            f"Repository {repo_id} has no file {current} at revision {revision or 'main'}; the release layout "
            f"changed, so download {repo_id} by hand and set ${WEIGHTS_ENV} to its weights file."
        ) from error
    except (httpx2.TransportError, OSError) as error:
        # OSError covers offline mode, hub HTTP errors and local disk problems: all leave the manual route.
        message = _manual_download_message(repo_id, current, revision, endpoint, weights_path, error)
        raise WeightsError(message) from error
    return weights_path


def _existing_weights(path: Path, origin: str) -> Path:
    readable(path, origin, folder=True, error=WeightsError,
             hint="point it at a SegVol weights file or folder.")
    return _weights_in_directory(path) if path.is_dir() else path


def _weights_in_directory(folder: Path) -> Path:
    for name in _WEIGHT_NAMES_IN_DIRECTORY:
        if (folder / name).is_file():
            return folder / name
    checkpoints = sorted(folder.glob("*.pth"))
    if len(checkpoints) == 1:
        return checkpoints[0]
    found = ", ".join(p.name for p in checkpoints) if checkpoints else "none"
    raise WeightsError(
        f"Folder {folder} holds no single weights file (looked for {', '.join(_WEIGHT_NAMES_IN_DIRECTORY)} or "
        f"one *.pth; *.pth found: {found}); name the weights file itself."
    )


def _hash_file(path: Path, hasher: Any, chunk: int) -> str:
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with path.open("rb") as stream:
        while read := stream.readinto(buffer):
            hasher.update(view[:read])
    return hasher.hexdigest()


def _git_blob_sha1(path: Path) -> str:
    """The object id git gives the file's bytes, which the hub reports as the ETag of non-LFS files."""
    hasher = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    return _hash_file(path, hasher, CHUNK_BYTES)


def _file_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


def _cached_sha256(path: Path) -> str:
    key = _file_key(path)
    digest = _verified_sha256.get(key)
    if digest is None:
        digest = sha256_file(path)
        _verified_sha256[key] = digest
    return digest


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + SHA256_SUFFIX)


def _read_sha256_record(path: Path) -> str | None:
    record = _record_path(path)
    if not record.is_file():
        return None
    fields = record.read_text(encoding="ascii", errors="replace").split()
    if not fields or not _SHA256_HEX.fullmatch(fields[0].lower()):
        raise WeightsError(f"Hash record {record} is unreadable; delete it and download the weights again.")
    return fields[0].lower()


def _write_sha256_record(path: Path, digest: str) -> None:
    """Writes ``<digest>  <name>`` (the ``sha256sum`` format, so ``sha256sum -c`` can check it too)."""
    write_text_atomic(_record_path(path), f"{digest}  {path.name}\n")


def _hub_file_metadata(repo_id: str, filename: str, revision: str | None, endpoint: str | None) -> tuple[str, str]:
    """(commit hash, ETag) the hub reports for one file; for LFS files the ETag is the content's SHA-256."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    metadata = get_hf_file_metadata(url, endpoint=endpoint)
    if not metadata.commit_hash or not metadata.etag:
        raise WeightsError(
            f"{url} answered without a commit hash or ETag, so it is not a Hugging Face hub; "
            "check the endpoint (HF_ENDPOINT) and any proxy in between."
        )
    return metadata.commit_hash, metadata.etag


def _expected_digest(filename: str, etag: str) -> tuple[str, str]:
    """("sha256" or "git-sha1", hex digest) that the downloaded ``filename`` must have."""
    etag = etag.lower()
    if _SHA256_HEX.fullmatch(etag):
        return "sha256", etag
    if filename != WEIGHTS_FILENAME and _GIT_SHA1_HEX.fullmatch(etag):
        return "git-sha1", etag
    raise WeightsError(
        f"The hub advertised ETag {etag!r} for {filename}, which is not a content hash, so the download "
        "cannot be verified; download the file by hand and set the path explicitly."
    )


def _digest(path: Path, kind: str) -> str:
    return _cached_sha256(path) if kind == "sha256" else _git_blob_sha1(path)


def _fetch_verified(
    repo_id: str, filename: str, commit: str, etag: str, folder: Path, progress: bool, endpoint: str | None
) -> None:
    """Put ``filename`` of ``repo_id`` at ``commit`` into ``folder`` unless a copy with the right digest is
    already there. The download lands in a private staging folder beside ``folder`` and only a verified file
    is moved into place (same file system, so the move is atomic)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import silent_tqdm

    kind, expected = _expected_digest(filename, etag)
    target = folder / filename
    if target.is_file() and _digest(target, kind) == expected:
        if filename == WEIGHTS_FILENAME:
            _write_sha256_record(target, expected)
        return
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=folder))
    try:
        downloaded = Path(
            hf_hub_download(
                repo_id,
                filename,
                revision=commit,
                local_dir=staging,
                endpoint=endpoint,
                tqdm_class=None if progress else silent_tqdm,
            )
        )
        actual = _digest(downloaded, kind)
        if actual != expected:
            raise WeightsError(
                f"The download of {filename} from {repo_id} is corrupted: its {kind} is {actual} but the hub "
                f"advertises {expected}. The bad copy was deleted; download again (or check the proxy)."
            )
        os.replace(downloaded, target)
        if filename == WEIGHTS_FILENAME:
            _verified_sha256[_file_key(target)] = actual
            _write_sha256_record(target, actual)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _manual_download_message(
    repo_id: str, filename: str, revision: str | None, endpoint: str | None, weights_path: Path, error: BaseException
) -> str:
    from huggingface_hub import hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
    return (
        f"Cannot download {filename} of {repo_id} ({type(error).__name__}: {error}). Check the connection, "
        f"or download {url} by hand (with the other files of {repo_id}: {', '.join(OFFICIAL_FILES)}) and put "
        f"them in {weights_path.parent}, so that the weights are at {weights_path}; "
        f"or set ${WEIGHTS_ENV} to the path of a downloaded {WEIGHTS_FILENAME}."
    )


@dataclass
class LoadedModel:
    """A model and how the user interface names it (which weights, and a warning for the DEMO model)."""

    model: object
    description: str


def pick_model(weights: str | os.PathLike | None = None, device: str = "cpu",
               correction: str | os.PathLike | None = "default") -> LoadedModel:
    """The model every front end uses: official weights when present (explicit path, $SEGVOLGRU_WEIGHTS, cache),
    else the shipped demo model, with its click corrector chosen by ``load_model``'s one rule (``correction``).
    The description names both. Raises WeightsError when neither can be loaded."""
    from .checkpoint import load_model
    from .demo_model import demo_model_path

    path = resolve_weights(weights)
    if path is not None:
        model = load_model(path, device=device, correction=correction)
        kind = "project model" if model.checkpoint_format == "segvolgru" else "SegVol weights"
        description = f"{kind} from {path} ({model.checkpoint_format} format)"
    else:
        path = demo_model_path()
        model = load_model(path, device=device, correction=correction)
        description = f"shipped DEMO model ({path.name}; trained on phantoms, not for clinical use)"
    return LoadedModel(model, f"{description}; corrector: {model.corrector_source}")


def download_in_background() -> concurrent.futures.Future:
    """``download_official_weights`` on a daemon thread, without progress bars (only the main thread may write
    to Slicer's console); the future gives the path or the error."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(download_official_weights(progress=False))
        except Exception as error:  # handed to whoever waits on the future
            future.set_exception(error)

    threading.Thread(target=run, name="SegVolGRU-download", daemon=True).start()
    return future

