"""A stand-in for the Hugging Face hub, just large enough for ``huggingface_hub.hf_hub_download``.

It answers ``HEAD``/``GET /{repo_id}/resolve/{revision}/{filename}`` on 127.0.0.1 with the headers the
client reads (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``, ``X-Linked-Size``, ``Content-Length``,
``X-Error-Code`` on 404). Like the real hub, an LFS file is answered with a redirect to a storage host
(``localhost`` instead of ``127.0.0.1``, so the client treats it as another host and takes the metadata from
the redirect itself); its ETag is the SHA-256 of the content, while small files get their git blob id.

``served`` replaces the bytes sent for a file while the advertised digests stay those of ``files``, which is
how a corrupted transfer or a tampering proxy looks to the client.
"""
from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

FAKE_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(content: bytes) -> str:
    """The object id git gives ``content`` (the hub's ETag of a non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class FakeHub:
    """Serves one repository at one commit from memory, in a daemon thread, for at most ``lifetime_s``.

    Use as a context manager; ``url`` is the endpoint to hand to the client and ``requests`` lists the
    ``(method, path)`` of every request received.
    """

    def __init__(
        self,
        repo_id: str,
        files: dict[str, bytes],
        lfs: frozenset[str] = frozenset(),
        served: dict[str, bytes] | None = None,
        commit: str = FAKE_COMMIT,
        lifetime_s: float = 30.0,
    ) -> None:
        self.repo_id = repo_id
        self.files = files
        self.lfs = lfs
        self.served = served or {}
        self.commit = commit
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._deadline = threading.Timer(lifetime_s, self.stop)
        self._deadline.daemon = True

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        self._deadline.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._deadline.cancel()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def etag(self, filename: str) -> str:
        content = self.files[filename]
        return hashlib.sha256(content).hexdigest() if filename in self.lfs else git_blob_sha1(content)

    def body(self, filename: str) -> bytes:
        return self.served.get(filename, self.files[filename])


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    resolve_prefix = f"/{hub.repo_id}/resolve/"
    storage_prefix = "/lfs-storage/"

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def log_message(self, format: str, *args: object) -> None:
            """Silenced: pytest shows failures, not every request."""

        def _answer(self, send_body: bool) -> None:
            path = unquote(self.path.split("?", 1)[0])
            hub.requests.append((self.command, path))
            if path.startswith(storage_prefix):
                self._serve_storage(path[len(storage_prefix):], send_body)
            elif path.startswith(resolve_prefix):
                revision, _, filename = path[len(resolve_prefix):].partition("/")
                self._serve_resolve(revision, filename, send_body)
            else:
                self._not_found("RepoNotFound")

        def _serve_resolve(self, revision: str, filename: str, send_body: bool) -> None:
            if revision not in ("main", hub.commit):
                self._not_found("RevisionNotFound")
            elif filename not in hub.files:
                self._not_found("EntryNotFound")
            elif filename in hub.lfs:
                etag = hub.etag(filename)
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{hub.port}{storage_prefix}{etag}")
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{git_blob_sha1(etag.encode())}"')
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(hub.files[filename])))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._send_content(hub.body(filename), hub.etag(filename), send_body)

        def _serve_storage(self, sha256: str, send_body: bool) -> None:
            names = [name for name in hub.lfs if hub.etag(name) == sha256]
            if not names:
                self._not_found("EntryNotFound")
            else:
                self._send_content(hub.body(names[0]), sha256, send_body)

        def _send_content(self, content: bytes, etag: str, send_body: bool) -> None:
            self.send_response(200)
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if send_body:
                self.wfile.write(content)

        def _not_found(self, error_code: str) -> None:
            self.send_response(404)
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Repo-Commit", hub.commit)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler
