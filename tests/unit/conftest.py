"""Shared helpers for the unit tests: write manifests into a temporary directory and load them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vmform.errors import ManifestErrors
from vmform.manifest.loader import load_manifests
from vmform.model import Manifests

PROJECT = "unit"


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture
def load_files(tmp_path: Path) -> Callable[..., Manifests]:
    """load_files({"a.yaml": "...", "b.yaml": b"..."}) -> Manifests (files loaded in the given order)."""

    def load(files: dict[str, str | bytes], project: str = PROJECT) -> Manifests:
        paths = [write(tmp_path, name, content) for name, content in files.items()]
        return load_manifests(project, paths, root=tmp_path)

    return load


@pytest.fixture
def load_errors(load_files: Callable[..., Manifests]) -> Callable[..., ManifestErrors]:
    """Like load_files, but the load must fail; returns the ManifestErrors."""

    def load(files: dict[str, str | bytes]) -> ManifestErrors:
        with pytest.raises(ManifestErrors) as info:
            load_files(files)
        return info.value

    return load
