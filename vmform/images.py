"""Local image inspection with qemu-img, done defensively: the format is always stated, output is JSON,
qemu-img runs under CPU and memory limits, and images that point at other files are refused."""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import resource
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmform.errors import VmformError

QEMU_IMG_CPU_SECONDS = 30
QEMU_IMG_MEMORY = 1024**3


class ImageError(VmformError):
    pass


@dataclass(frozen=True)
class ImageInfo:
    virtual_size: int
    actual_size: int


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (QEMU_IMG_CPU_SECONDS, QEMU_IMG_CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_AS, (QEMU_IMG_MEMORY, QEMU_IMG_MEMORY))


def inspect_image(path: str, image_format: str) -> ImageInfo:
    try:
        completed = subprocess.run(
            ["qemu-img", "info", "-f", image_format, "--output=json", path],
            capture_output=True, text=True, timeout=60, preexec_fn=_limits, check=False,
        )
    except FileNotFoundError:
        raise ImageError("qemu-img is not installed (package qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise ImageError(f"qemu-img took too long to inspect {path}") from None
    if completed.returncode != 0:
        message = " ".join(completed.stderr.split()) or "qemu-img failed"
        raise ImageError(f"{path} is not a valid {image_format} image: {message}")
    info = json.loads(completed.stdout)
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageError(f"{path} refers to a backing file ({info.get('backing-filename')}); upload a standalone image")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if data_file:
        raise ImageError(f"{path} uses an external data file ({data_file}); upload a standalone image")
    return ImageInfo(int(info["virtual-size"]), int(info.get("actual-size", 0)))


# ------------------------------------------------------------------------------------ fetching sources

CHUNK = 1024 * 1024


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def cache_dir() -> Path:
    """Where downloads and decompressed images are kept: $VMFORM_CACHE_DIR, else the XDG cache."""
    configured = os.environ.get("VMFORM_CACHE_DIR")
    base = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmform"
    return base / "images"


_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path | str) -> str:
    """sha256 of a file, remembered per (path, size, mtime) within one process."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(CHUNK), b""):
                digest.update(block)
        _digests[key] = digest.hexdigest()
    return _digests[key]


def local_image(source: str, expected_sha256: str | None = None) -> Path:
    """A local, uncompressed image for a volume's source: downloaded (resuming a partial download) into the
    cache when it is a URL, checked against ``expected_sha256`` (of the file as served or given), and
    decompressed (xz, gzip) into the cache. Nothing reaches the host before this has succeeded."""
    directory = cache_dir()
    downloaded = _download(source, directory) if is_url(source) else Path(source)
    digest = file_digest(downloaded)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        if is_url(source):
            downloaded.unlink(missing_ok=True)
        raise ImageError(f"{source}: sha256 is {digest}, the manifest expects {expected_sha256}")
    compression = _compression(downloaded)
    if compression is None:
        return downloaded
    target = directory / "sha256" / f"{digest}.img"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part")
        opener = lzma.open if compression == "xz" else gzip.open
        try:
            with opener(downloaded, "rb") as packed, open(partial, "wb") as unpacked:
                shutil.copyfileobj(packed, unpacked, CHUNK)
        except (OSError, EOFError, lzma.LZMAError) as exc:
            partial.unlink(missing_ok=True)
            raise ImageError(f"{source}: cannot decompress ({compression}): {exc}") from None
        partial.rename(target)
    return target


def _compression(path: Path) -> str | None:
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    return None


# A connection dropped mid-way is resumed (HTTP Range) at once, as long as each attempt brings more bytes.
DOWNLOAD_ATTEMPTS = 5


class _ProgressBars:
    """Download progress bars on stderr when it is a terminal (nothing otherwise), one rich display shared by
    the downloads running at once in apply's worker threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._progress: Any = None
        self._active = 0

    @contextmanager
    def bar(self, description: str, total: int | None, completed: int) -> Iterator[Callable[[int], None]]:
        if not sys.stderr.isatty():
            yield lambda _count: None
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        with self._lock:
            if self._progress is None:
                self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                          TransferSpeedColumn(), TimeRemainingColumn(),
                                          console=Console(file=sys.stderr))
                self._progress.start()
            progress = self._progress
            self._active += 1
            task = progress.add_task(description, total=total, completed=completed)
        try:
            yield lambda count: progress.advance(task, count)
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    progress.stop()
                    self._progress = None


PROGRESS = _ProgressBars()


def _expected_size(response: Any, offset: int) -> int | None:
    """The whole file's size as the server states it (Content-Range's total, or Content-Length)."""
    content_range = response.headers.get("Content-Range") or ""
    if offset and "/" in content_range and content_range.rsplit("/", 1)[1].strip().isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit():
        return int(length) + offset
    return None


def _resumes_at(response: Any, offset: int) -> bool:
    """Whether a 206 answer continues exactly where the partial file ends."""
    content_range = response.headers.get("Content-Range") or ""
    return response.status == 206 and content_range.replace("bytes ", "", 1).split("-", 1)[0].strip() == str(offset)


def _download(url: str, directory: Path) -> Path:
    """The file at url, in the cache; an interrupted download resumes where it stopped (HTTP Range), both
    within one run (a dropped connection) and in the next one (the partial file is kept)."""
    import http.client
    import urllib.error
    import urllib.request

    key = hashlib.sha256(url.encode()).hexdigest()
    done = directory / "downloads" / key
    if done.exists():
        return done
    done.parent.mkdir(parents=True, exist_ok=True)
    partial = done.with_suffix(".part")
    shown = url.rsplit("/", 1)[-1] or url
    problem: BaseException | None = None
    for _attempt in range(DOWNLOAD_ATTEMPTS):
        offset = partial.stat().st_size if partial.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - http(s) only (is_url)
                resumed = bool(offset) and _resumes_at(response, offset)
                start = offset if resumed else 0
                total = _expected_size(response, start)
                with open(partial, "ab" if resumed else "wb") as handle, \
                        PROGRESS.bar(f"downloading {shown}", total, start) as advance:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        handle.write(block)
                        advance(len(block))
            size = partial.stat().st_size
            if total is not None and size < total:
                raise http.client.IncompleteRead(b"", total - size)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:  # the partial file is already whole
                partial.rename(done)
                return done
            raise ImageError(f"cannot download {url}: HTTP {exc.code} {exc.reason}{_kept(partial)}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            problem = exc
            if (partial.stat().st_size if partial.exists() else 0) <= offset:
                break  # no progress this time: resuming again would not help now
            continue
        partial.rename(done)
        return done
    if isinstance(problem, http.client.HTTPException):
        reason: Any = "the connection closed before the end of the file"
    else:
        reason = getattr(problem, "reason", None) or problem
    raise ImageError(f"cannot download {url}: {reason}{_kept(partial)}")


def _kept(partial: Path) -> str:
    kept = partial.stat().st_size if partial.exists() else 0
    return f" ({kept} bytes kept; the next run resumes there)" if kept else ""
