"""Where the images to index come from: a folder scanned, or a CSV list."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from index_builder.records import Source


class SourceListError(ValueError):
    """A --list file is missing or malformed; the message names the file, line and format."""


def scan_folder(root: Path) -> list[Source]:
    """Every non-hidden file under ``root``, sorted; key = relative path, label = first folder.
    Paths are made absolute: the index records where to find each file from anywhere."""
    if not root.is_dir():
        raise SourceListError(f"{root}: no such folder of images")
    root = root.absolute()
    sources = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root)
            label = rel.parts[0] if len(rel.parts) > 1 else None
            sources.append(Source(path, rel.as_posix(), label))
    return sources


def read_list(csv_path: Path) -> list[Source]:
    """A CSV with a header naming ``path`` and optionally ``key`` and ``label``; relative paths
    are relative to the CSV's folder; the key defaults to the path as written."""
    try:
        text = csv_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceListError(f"{csv_path}: cannot read the list ({e})") from e
    rows = csv.DictReader(text.splitlines())
    if rows.fieldnames is None or "path" not in rows.fieldnames:
        raise SourceListError(
            f"{csv_path}: the first line must be a CSV header with a 'path' column "
            "(and optionally 'key' and 'label'), e.g. 'path,key,label'"
        )
    sources = []
    for row in rows:
        raw = (row.get("path") or "").strip()
        if not raw:
            raise SourceListError(f"{csv_path}:{rows.line_num}: empty path")
        path = Path(raw) if Path(raw).is_absolute() else csv_path.parent.absolute() / raw
        key = (row.get("key") or "").strip() or raw
        try:
            sources.append(Source(path, key, (row.get("label") or "").strip() or None))
        except ValueError as e:
            raise SourceListError(f"{csv_path}:{rows.line_num}: {e}") from e
    return sources
