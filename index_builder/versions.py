"""An index folder's versions: ``CURRENT`` names the live one; a complete new version is
published by renaming it into place and replacing ``CURRENT`` atomically."""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from pathlib import Path

from index_builder.files import crashpoint, fsync_dir, write_atomic
from index_builder.manifest import IndexFormatError, now

log = logging.getLogger(__name__)

CURRENT = "CURRENT"


def has_index(root: Path) -> bool:
    """Whether ``root`` holds a published index (a build in progress does not count)."""
    return (root / CURRENT).is_file()


def live_version(root: Path) -> Path:
    """The folder that ``root/CURRENT`` names."""
    pointer = root / CURRENT
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError as e:
        if not root.exists():
            raise IndexFormatError(
                f"{root}: no such index folder; build one with `diml index build`"
            ) from e
        raise IndexFormatError(
            f"{root}: not an index (no {CURRENT} file); build one with `diml index build`"
        ) from e
    folder = root / name
    if "/" in name or not folder.is_dir():
        raise IndexFormatError(f"{root}: {CURRENT} names {name!r}, which is missing; rebuild")
    return folder


def publish(root: Path, ready: Path) -> Path:
    """Make the complete artefact in ``ready`` the live version, atomically; old ones go."""
    name = f"v-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"
    final = root / name
    ready.rename(final)
    fsync_dir(root)
    crashpoint("build:renamed")
    write_atomic(root / CURRENT, (name + "\n").encode())
    crashpoint("build:published")
    for old in root.glob("v-*"):
        if old.name != name and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    log.info("published %s (%s)", final, now())
    return final
