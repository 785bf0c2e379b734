"""Images from URLs: served by a local HTTP server, checked against sha256, decompressed (xz, gzip), cached,
uploaded through libvirt; a checksum mismatch fails before anything reaches the host."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import lzma
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_url_images_with_checksums_and_compression(project: Any, conn: Any, served: tuple[str, Path],
                                                   tmp_path: Path, monkeypatch: Any) -> None:
    base_url, www = served
    monkeypatch.setenv("VMFORM_CACHE_DIR", str(tmp_path / "cache"))
    image = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "48M"], check=True)
    (www / "base.qcow2.xz").write_bytes(lzma.compress(image.read_bytes()))
    local_gz = project.root / "local.qcow2.gz"  # a local source must be inside the project
    local_gz.write_bytes(gzip.compress(image.read_bytes()))
    p = project.prefix

    def manifest(checksum: str) -> str:
        return f"""
pools:
  pool: {{name: {p}-pool, path: {project.pool_dir}}}
volumes:
  base: {{name: {p}-base, pool: pool, source: "{base_url}/base.qcow2.xz", sha256: "{checksum}"}}
  local: {{name: {p}-local, pool: pool, source: {local_gz}}}
  overlay: {{name: {p}-overlay, pool: pool, backing: base, size: 64MiB}}
"""

    wrong = "0" * 64
    project.write(manifest(wrong))
    failed = project.run("apply", "--auto-approve")
    assert failed.code == 1 and f"sha256 is {sha256(www / 'base.qcow2.xz')}, the manifest expects {wrong}" in failed.stderr
    pool = conn.storagePoolLookupByName(f"{p}-pool")
    assert f"{p}-base" not in pool.listVolumes()  # nothing reached the host for it

    project.write(manifest(sha256(www / "base.qcow2.xz")))
    project.apply()
    pool.refresh(0)
    for name in (f"{p}-base", f"{p}-local"):
        assert pool.storageVolLookupByName(name).info()[1] == 48 * 1024**2  # the decompressed image's size
    assert "No changes." in project.run("plan", check=True).stdout
    assert list((tmp_path / "cache" / "images" / "downloads").iterdir())  # cached for the next apply
