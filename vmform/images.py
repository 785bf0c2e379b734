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
from dataclasses import dataclass
from pathlib import Path

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


def _download(url: str, directory: Path) -> Path:
    """The file at url, in the cache; an interrupted download resumes where it stopped."""
    import urllib.error
    import urllib.request

    key = hashlib.sha256(url.encode()).hexdigest()
    done = directory / "downloads" / key
    if done.exists():
        return done
    done.parent.mkdir(parents=True, exist_ok=True)
    partial = done.with_suffix(".part")
    offset = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - http(s) only (is_url)
            resumed = offset and response.status == 206
            with open(partial, "ab" if resumed else "wb") as handle:
                shutil.copyfileobj(response, handle, CHUNK)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # the partial file is already whole
            partial.rename(done)
            return done
        raise ImageError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ImageError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None
    partial.rename(done)
    return done
