"""Downloads of source images: resumed with HTTP Range after the connection drops (in the same run and in the
next one), restarted when the server ignores Range, and shown as a progress bar only on a terminal. The
server is started by the test on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmform import images

CONTENT = os.urandom(3 * images.CHUNK + 12345)


@dataclass
class Server:
    url: str
    ranges: list[str | None] = field(default_factory=list)  # the Range header of each request
    drop_after: list[int] = field(default_factory=list)  # per request: bytes sent before the connection drops
    honour_range: bool = True
    fail_after_drops: bool = False  # once drop_after is used up, answer 503


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server("")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            requested = self.headers.get("Range")
            state.ranges.append(requested)
            drop = state.drop_after.pop(0) if state.drop_after else None
            if drop is None and state.fail_after_drops:
                self.send_error(503)
                return
            start = int(requested.split("=")[1].split("-")[0]) if requested and state.honour_range else 0
            body = CONTENT[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(CONTENT) - 1}/{len(CONTENT)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if drop is not None:
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the connection drops mid-way
                return
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/image.qcow2"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VMFORM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "images"


def test_a_dropped_connection_resumes_where_it_stopped(server: Server) -> None:
    server.drop_after = [images.CHUNK + 100, images.CHUNK]
    path = images.local_image(server.url, hashlib.sha256(CONTENT).hexdigest())
    assert path.read_bytes() == CONTENT
    first, second = images.CHUNK + 100, 2 * images.CHUNK + 100
    assert server.ranges == [None, f"bytes={first}-", f"bytes={second}-"]
    assert not path.with_suffix(".part").exists()
    # Cached: no further request.
    assert images.local_image(server.url) == path and len(server.ranges) == 3


def test_an_interrupted_run_leaves_the_part_and_the_next_run_resumes(server: Server, cache: Path) -> None:
    server.drop_after = [5000]
    server.fail_after_drops = True  # the host goes away: this run fails, keeping what it has
    with pytest.raises(images.ImageError, match="5000 bytes kept; the next run resumes there"):
        images.local_image(server.url)
    part = cache / "downloads" / (hashlib.sha256(server.url.encode()).hexdigest() + ".part")
    assert part.read_bytes() == CONTENT[:5000]
    server.fail_after_drops = False
    path = images.local_image(server.url, hashlib.sha256(CONTENT).hexdigest())
    assert path.read_bytes() == CONTENT
    assert server.ranges[-1] == "bytes=5000-"


def test_a_server_ignoring_range_restarts_the_file(server: Server) -> None:
    server.honour_range = False
    server.drop_after = [7000]
    path = images.local_image(server.url, hashlib.sha256(CONTENT).hexdigest())
    assert path.read_bytes() == CONTENT  # the 200 answer was written from the start, not appended
    assert server.ranges == [None, "bytes=7000-"]


def test_no_progress_output_without_a_terminal(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    images.local_image(server.url)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    server.drop_after = [images.CHUNK]
    images.local_image(server.url)
    shown = terminal.getvalue()
    assert "downloading image.qcow2" in shown
    assert f"{len(CONTENT) / 1e6:.1f}/{len(CONTENT) / 1e6:.1f} MB" in shown, shown[-500:]
