"""Weights resolution and the verified download of the official release, against a local fake hub.

No test touches the network: the hub is ``fake_hub.FakeHub`` on 127.0.0.1, and ``huggingface_hub`` is
pointed at it with ``endpoint=`` and kept away from the user's real cache, token and telemetry.
"""
from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from fake_hub import FakeHub
from segvolgru.errors import WeightsError
from segvolgru.weights import (
    OFFICIAL_REPO_ID,
    download_official_weights,
    official_weights_path,
    resolve_weights,
    sha256_file,
    verify_weights,
)

FAKE_WEIGHTS = bytes(range(256)) * 16
RELEASE = {
    "config.json": b'{"model_type": "segvol", "spatial_size": [32, 256, 256]}',
    "vocab.json": b'{"<|startoftext|>": 0, "liver</w>": 1}',
    "merges.txt": b"#version: 0.2\nl i\n",
    "tokenizer_config.json": b'{"tokenizer_class": "CLIPTokenizer"}',
    "special_tokens_map.json": b'{"pad_token": "<|endoftext|>"}',
    "pytorch_model.bin": FAKE_WEIGHTS,
}
LFS = frozenset({"pytorch_model.bin"})


def _flip_one_byte(content: bytes, at: int = 100) -> bytes:
    return content[:at] + bytes([content[at] ^ 0xFF]) + content[at + 1:]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty SegVolGRU cache and a throw-away Hugging Face home, with no token and no telemetry."""
    import huggingface_hub.constants as hf_constants

    hf_home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads its environment once, at import: its module constants are what it uses.
    monkeypatch.setattr(hf_constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    root = tmp_path / "segvolgru-cache"
    monkeypatch.setenv("SEGVOLGRU_CACHE", str(root))
    monkeypatch.delenv("SEGVOLGRU_WEIGHTS", raising=False)
    return root


def _repo_dir(cache: Path) -> Path:
    return cache / "BAAI--SegVol"


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".incoming-")) if folder.exists() else []


def test_download_stores_verified_weights_release_files_and_sha256_record(cache: Path) -> None:
    with FakeHub(OFFICIAL_REPO_ID, RELEASE, lfs=LFS) as hub:
        path = download_official_weights(progress=False, endpoint=hub.url)

    expected_sha = hashlib.sha256(FAKE_WEIGHTS).hexdigest()
    assert path == _repo_dir(cache) / "pytorch_model.bin"
    assert path.read_bytes() == FAKE_WEIGHTS
    assert (_repo_dir(cache) / "pytorch_model.bin.sha256").read_text() == f"{expected_sha}  pytorch_model.bin\n"
    for name, content in RELEASE.items():
        assert (_repo_dir(cache) / name).read_bytes() == content
    assert sorted(p.name for p in _repo_dir(cache).iterdir()) == sorted([*RELEASE, "pytorch_model.bin.sha256"])
    assert resolve_weights() == path
    assert verify_weights(path) == expected_sha


def test_second_download_keeps_verified_files_without_fetching_them_again(cache: Path) -> None:
    with FakeHub(OFFICIAL_REPO_ID, RELEASE, lfs=LFS) as hub:
        first = download_official_weights(progress=False, endpoint=hub.url)
        hub.requests.clear()
        second = download_official_weights(progress=False, endpoint=hub.url)

    assert second == first
    assert [request for request in hub.requests if request[0] == "GET"] == []


def test_weights_not_matching_the_advertised_sha256_are_refused_and_never_loadable(cache: Path) -> None:
    corrupted = {"pytorch_model.bin": _flip_one_byte(FAKE_WEIGHTS)}
    with FakeHub(OFFICIAL_REPO_ID, RELEASE, lfs=LFS, served=corrupted) as hub:
        with pytest.raises(WeightsError, match="pytorch_model.bin .*corrupted.*deleted"):
            download_official_weights(progress=False, endpoint=hub.url)

    assert not official_weights_path().exists()
    assert not (_repo_dir(cache) / "pytorch_model.bin.sha256").exists()
    assert _leftovers(_repo_dir(cache)) == []
    assert resolve_weights() is None


def test_tampered_tokenizer_file_is_refused_before_the_weights_are_fetched(cache: Path) -> None:
    tampered = {"vocab.json": RELEASE["vocab.json"].replace(b"liver", b"lever")}
    with FakeHub(OFFICIAL_REPO_ID, RELEASE, lfs=LFS, served=tampered) as hub:
        with pytest.raises(WeightsError, match="vocab.json .*git-sha1"):
            download_official_weights(progress=False, endpoint=hub.url)

    assert not (_repo_dir(cache) / "vocab.json").exists()
    assert resolve_weights() is None


def test_corrupted_cached_weights_are_replaced_by_a_fresh_verified_download(cache: Path) -> None:
    with FakeHub(OFFICIAL_REPO_ID, RELEASE, lfs=LFS) as hub:
        path = download_official_weights(progress=False, endpoint=hub.url)
        path.write_bytes(_flip_one_byte(FAKE_WEIGHTS))
        with pytest.raises(WeightsError, match="corrupted or replaced"):
            verify_weights(path)
        download_official_weights(progress=False, endpoint=hub.url)

    assert path.read_bytes() == FAKE_WEIGHTS
    assert verify_weights(path) == hashlib.sha256(FAKE_WEIGHTS).hexdigest()


def test_unreachable_hub_error_names_repository_file_cache_path_and_env_var(cache: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]

    with pytest.raises(WeightsError) as raised:
        download_official_weights(progress=False, endpoint=f"http://127.0.0.1:{closed_port}")

    message = str(raised.value)
    assert "BAAI/SegVol" in message
    assert "pytorch_model.bin" in message
    assert str(_repo_dir(cache) / "pytorch_model.bin") in message
    assert "SEGVOLGRU_WEIGHTS" in message
    assert resolve_weights() is None


def test_file_missing_from_the_hub_repository_is_reported_by_name(cache: Path) -> None:
    incomplete = {name: content for name, content in RELEASE.items() if name != "merges.txt"}
    with FakeHub(OFFICIAL_REPO_ID, incomplete, lfs=LFS) as hub:
        with pytest.raises(WeightsError, match="BAAI/SegVol has no file merges.txt"):
            download_official_weights(progress=False, endpoint=hub.url)


@pytest.mark.parametrize("repo_id, revision, message", [
    ("BAAI/SegVol-missing", None, "no repository BAAI/SegVol-missing"),
    (OFFICIAL_REPO_ID, "v9", "BAAI/SegVol has no revision 'v9'"),
])
def test_unknown_repository_or_revision_is_a_weights_error_saying_which(
        cache: Path, repo_id: str, revision: str | None, message: str) -> None:
    with FakeHub(OFFICIAL_REPO_ID, RELEASE, lfs=LFS) as hub:
        with pytest.raises(WeightsError, match=message):
            download_official_weights(repo_id=repo_id, revision=revision, progress=False, endpoint=hub.url)
    assert resolve_weights() is None


def test_verify_weights_detects_a_changed_byte_against_the_sha256_record(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(FAKE_WEIGHTS)
    digest = hashlib.sha256(FAKE_WEIGHTS).hexdigest()
    (tmp_path / "pytorch_model.bin.sha256").write_text(f"{digest}  pytorch_model.bin\n")
    assert verify_weights(path) == digest

    before = path.stat()
    path.write_bytes(_flip_one_byte(FAKE_WEIGHTS))
    # A later edit: file systems with coarse timestamps could otherwise give both writes the same mtime.
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))

    with pytest.raises(WeightsError, match="corrupted or replaced.*download the weights again"):
        verify_weights(path)


def test_verify_weights_without_record_returns_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "segvol.pth"
    path.write_bytes(b"weights")
    assert verify_weights(path) == hashlib.sha256(b"weights").hexdigest()


def test_verify_weights_trusts_an_unchanged_file_without_rereading_it(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(FAKE_WEIGHTS)
    first = verify_weights(path)
    before = path.stat()
    # Same size, inode and modification time: the in-process record is trusted, so the new bytes go unread.
    with path.open("r+b") as stream:
        stream.write(b"\x00")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))

    assert verify_weights(path) == first


def test_verify_weights_of_a_missing_file_is_a_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not exist"):
        verify_weights(tmp_path / "absent.bin")


@pytest.mark.parametrize("size", [0, 1, 7, 8, 20])
def test_sha256_file_matches_hashlib_whatever_the_chunk_boundaries(tmp_path: Path, size: int) -> None:
    content = bytes(range(size))
    path = tmp_path / "blob"
    path.write_bytes(content)
    assert sha256_file(path, chunk=7) == hashlib.sha256(content).hexdigest()


def test_resolver_prefers_explicit_path_then_env_var_then_cache(cache: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_weights() is None

    cached = official_weights_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    assert resolve_weights() == cached

    from_env = tmp_path / "env.pth"
    from_env.write_bytes(b"env")
    monkeypatch.setenv("SEGVOLGRU_WEIGHTS", str(from_env))
    assert resolve_weights() == from_env

    explicit = tmp_path / "explicit.safetensors"
    explicit.write_bytes(b"explicit")
    assert resolve_weights(explicit) == explicit
    assert resolve_weights(str(explicit)) == explicit


def test_cache_location_defaults_to_the_user_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SEGVOLGRU_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert official_weights_path() == tmp_path / ".cache" / "segvolgru" / "BAAI--SegVol" / "pytorch_model.bin"
    elsewhere = tmp_path / "elsewhere"
    assert official_weights_path(elsewhere) == elsewhere / "BAAI--SegVol" / "pytorch_model.bin"


def test_missing_explicit_path_is_a_weights_error_naming_it(cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "segvol.pth"
    with pytest.raises(WeightsError, match="nowhere.*does not exist"):
        resolve_weights(missing)


def test_env_var_naming_a_missing_file_is_a_weights_error_not_a_silent_fallback(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = official_weights_path()
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"cached")
    monkeypatch.setenv("SEGVOLGRU_WEIGHTS", str(tmp_path / "gone.bin"))
    with pytest.raises(WeightsError, match=r"\$SEGVOLGRU_WEIGHTS .*gone.bin.*does not exist"):
        resolve_weights()


@pytest.mark.parametrize("names, chosen", [
    (["pytorch_model.bin", "model.safetensors", "a.pth"], "pytorch_model.bin"),
    (["model.safetensors", "a.pth"], "model.safetensors"),
    (["segvol_v1.pth", "notes.txt"], "segvol_v1.pth"),
])
def test_directory_resolves_to_the_weights_file_inside(tmp_path: Path, names: list[str], chosen: str) -> None:
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert resolve_weights(tmp_path) == tmp_path / chosen


@pytest.mark.parametrize("names", [[], ["a.pth", "b.pth"]])
def test_directory_without_a_single_weights_file_is_a_weights_error(tmp_path: Path, names: list[str]) -> None:
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(WeightsError, match="no single weights file"):
        resolve_weights(tmp_path)
