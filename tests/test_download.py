"""Tests for pipelines.data.download against a real HTTP server on 127.0.0.1.

The server serves a small aclImdb-like tarball and can misbehave on demand
(drop the connection halfway, ignore Range, answer 404, stall), so resume,
truncation, checksum and error paths run over real sockets, never the internet.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import socket
import tarfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.core.errors import DownloadError
from pipelines.data.download import download, fetch_to_cache, part_path, sha256_of

CHUNK = 4096  # small, so the ~tens of KB archive arrives in many chunks
FILE_PATH = "/data/aclImdb_v1.tar.gz"


@pytest.fixture(scope="session")
def archive() -> bytes:
    """A tiny aclImdb tree as tar.gz; random words keep it tens of KB after gzip."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 9))) for _ in range(3000)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for split in ("train", "test"):
            for label, rating in (("pos", 9), ("neg", 2)):
                for i in range(3):
                    text = " ".join(rng.choices(words, k=900)).encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_{rating}.txt")
                    info.size = len(text)
                    tar.addfile(info, io.BytesIO(text))
    data = buf.getvalue()
    assert 20_000 < len(data) < 200_000, len(data)
    return data


@dataclass
class FakeServer:
    """What a test controls and observes: the mode, the body, the requests seen."""

    body: bytes
    port: int = 0
    mode: str = "normal"  # normal | truncate | ignore-range | 404 | stall
    requests: list[dict] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{FILE_PATH}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def _make_handler(state: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass  # keep stderr clean: the progress tests read it

        def do_GET(self) -> None:
            record = {"path": self.path, "range": self.headers.get("Range"), "status": None}
            state.requests.append(record)
            body, total = state.body, len(state.body)
            if state.mode == "404":
                record["status"] = 404
                self.send_error(404, "Not Found")
                return
            start = self._range_start()
            if start is None or state.mode == "ignore-range":
                record["status"] = 200
                self.send_response(200)
                start = 0
            elif start >= total:
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            else:
                record["status"] = 206
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            payload = body[start:]
            self.send_header("Content-Type", "application/gzip")
            self.send_header("Content-Length", str(len(payload)))  # the full length, always
            self.end_headers()
            if state.mode == "truncate":
                self.wfile.write(payload[: len(payload) // 2])
                self.close_connection = True  # the drop: the promised rest never comes
            elif state.mode == "stall":
                self.wfile.write(payload[: len(payload) // 4])
                self.wfile.flush()
                state.release.wait(30)  # hang until the test ends; the client must time out
            else:
                self.wfile.write(payload)

        def _range_start(self) -> int | None:
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            return int(match.group(1)) if match else None

    return Handler


@pytest.fixture
def server(archive: bytes):
    state = FakeServer(body=archive)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def _get(server: FakeServer, dest: Path, **kwargs) -> Path:
    kwargs.setdefault("sha256", server.sha256)
    kwargs.setdefault("progress", False)
    kwargs.setdefault("timeout_s", 10)
    return download(server.url, dest, chunk_size=CHUNK, **kwargs)


@pytest.mark.timeout(60)
def test_sha256_of_matches_hashlib(tmp_path: Path, archive: bytes) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(archive)
    assert sha256_of(path, chunk_size=1000) == hashlib.sha256(archive).hexdigest()


@pytest.mark.timeout(60)
def test_complete_download_verifies_and_leaves_no_part(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "sub" / "aclImdb_v1.tar.gz"
    assert _get(server, dest) == dest
    assert dest.read_bytes() == server.body
    assert not part_path(dest).exists()
    assert [r["range"] for r in server.requests] == [None]  # nothing to resume: a plain GET
    with tarfile.open(dest) as tar:
        assert "aclImdb/train/pos/0_9.txt" in tar.getnames()


@pytest.mark.timeout(60)
def test_without_checksum_still_downloads_everything(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    _get(server, dest, sha256=None)
    assert dest.read_bytes() == server.body


@pytest.mark.timeout(60)
def test_present_valid_file_is_returned_without_network(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    dest.write_bytes(server.body)
    assert _get(server, dest) == dest
    assert _get(server, dest, sha256=None) == dest
    assert server.requests == []


@pytest.mark.timeout(60)
def test_present_file_with_wrong_checksum_is_replaced(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    dest.write_bytes(b"stale")
    _get(server, dest)
    assert dest.read_bytes() == server.body
    assert len(server.requests) == 1


@pytest.mark.timeout(60)
def test_checksum_mismatch_deletes_everything(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        _get(server, dest, sha256=wrong)
    message = str(info.value)
    assert server.url in message
    assert wrong in message and server.sha256 in message
    assert not dest.exists()
    assert not part_path(dest).exists()


@pytest.mark.timeout(60)
def test_interrupted_download_keeps_part_and_resumes(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    part = part_path(dest)
    total = len(server.body)
    server.mode = "truncate"
    with pytest.raises(DownloadError) as info:
        _get(server, dest)
    kept = part.stat().st_size
    assert 0 < kept < total
    assert part.read_bytes() == server.body[:kept]  # what arrived is intact, so resumable
    assert not dest.exists()
    message = str(info.value)
    assert server.url in message
    assert f"received {kept} of {total} bytes" in message
    assert str(part) in message and "resumes" in message

    server.mode = "normal"
    assert _get(server, dest) == dest
    assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert server.requests[-1]["status"] == 206
    assert sha256_of(dest) == server.sha256
    assert not part.exists()


@pytest.mark.timeout(60)
def test_truncation_is_caught_without_checksum(tmp_path: Path, server: FakeServer) -> None:
    # The length check alone must catch it: sha256=None must not accept half a file.
    dest = tmp_path / "a.tar.gz"
    server.mode = "truncate"
    with pytest.raises(DownloadError, match="interrupted"):
        _get(server, dest, sha256=None)
    assert not dest.exists()
    assert part_path(dest).exists()


@pytest.mark.timeout(60)
def test_server_ignoring_range_starts_over(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    # A junk .part longer than the file: appending the 200 body, or writing it
    # over the start and leaving the tail, would both give a wrong file.
    junk = len(server.body) + 500
    part_path(dest).write_bytes(b"x" * junk)
    server.mode = "ignore-range"
    _get(server, dest)
    assert dest.read_bytes() == server.body
    assert server.requests[0]["range"] == f"bytes={junk}-"
    assert server.requests[0]["status"] == 200


@pytest.mark.timeout(60)
def test_416_with_complete_part_is_verified_and_used(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    part_path(dest).write_bytes(server.body)
    _get(server, dest)
    assert dest.read_bytes() == server.body
    assert [r["status"] for r in server.requests] == [416]
    assert not part_path(dest).exists()


@pytest.mark.timeout(60)
def test_416_with_bad_part_starts_over_once(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    part_path(dest).write_bytes(b"y" * (len(server.body) + 10))  # bigger than the file
    _get(server, dest)
    assert dest.read_bytes() == server.body
    assert [(r["range"], r["status"]) for r in server.requests] == [
        (f"bytes={len(server.body) + 10}-", 416),
        (None, 200),
    ]


@pytest.mark.timeout(60)
def test_http_404_names_url_and_status(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    server.mode = "404"
    with pytest.raises(DownloadError) as info:
        _get(server, dest)
    assert server.url in str(info.value)
    assert "HTTP 404 Not Found" in str(info.value)
    assert not dest.exists() and not part_path(dest).exists()


@pytest.mark.timeout(60)
def test_refused_connection_names_url(tmp_path: Path) -> None:
    with socket.socket() as sock:  # grab a free port, then close it: nobody listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}{FILE_PATH}"
    with pytest.raises(DownloadError) as info:
        download(url, tmp_path / "a.tar.gz", sha256=None, progress=False, timeout_s=5)
    assert url in str(info.value)
    assert "cannot reach the server" in str(info.value)


@pytest.mark.timeout(60)
def test_stalled_server_times_out_and_keeps_part(tmp_path: Path, server: FakeServer) -> None:
    dest = tmp_path / "a.tar.gz"
    server.mode = "stall"
    began = time.monotonic()
    with pytest.raises(DownloadError, match="interrupted"):
        _get(server, dest, timeout_s=0.5)
    assert time.monotonic() - began < 10  # the socket timeout fired, not the 30 s stall
    assert 0 < part_path(dest).stat().st_size < len(server.body)


@pytest.mark.timeout(60)
def test_progress_false_prints_nothing(tmp_path: Path, server: FakeServer, capsys) -> None:
    _get(server, tmp_path / "a.tar.gz", progress=False)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


@pytest.mark.timeout(60)
def test_progress_true_draws_bar_on_stderr(tmp_path: Path, server: FakeServer, capsys) -> None:
    # The counterpart of the test above: proves capsys does see the bar when it is on.
    _get(server, tmp_path / "a.tar.gz", progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "a.tar.gz" in captured.err and "100%" in captured.err


@pytest.mark.timeout(60)
def test_fetch_to_cache_uses_url_basename(tmp_path: Path, server: FakeServer) -> None:
    cache = tmp_path / "cache" / "nested"
    path = fetch_to_cache(server.url + "?mirror=1", cache, sha256=server.sha256, progress=False)
    assert path == cache / "aclImdb_v1.tar.gz"
    assert path.read_bytes() == server.body
    # Cached now: a second call must not touch the server.
    assert fetch_to_cache(server.url, cache, sha256=server.sha256, progress=False) == path
    assert len(server.requests) == 1


@pytest.mark.timeout(60)
def test_fetch_to_cache_rejects_url_without_file_name(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="no file name"):
        fetch_to_cache("http://127.0.0.1:9/", tmp_path, sha256=None, progress=False)
