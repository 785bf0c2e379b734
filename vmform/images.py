"""Local image inspection with qemu-img, done defensively: the format is always stated, output is JSON,
qemu-img runs under CPU and memory limits, and images that point at other files are refused."""

from __future__ import annotations

import json
import resource
import subprocess
from dataclasses import dataclass

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
