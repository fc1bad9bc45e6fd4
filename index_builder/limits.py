"""The index builder's limits, declared once: how long an item's key and label may be, for every
path that writes them (an index build or add, the service's ``POST /gallery``) and every path
that reads them back (the service's ``label`` and ``exclude_label`` search filters, the size the
service plans an answer for), so that whatever one accepts the other takes; and how large a file
a build or add reads. The limits on decoding an image are :mod:`model.image_limits`'."""

from __future__ import annotations

# Keys are file names, relative paths under a gallery folder (``scan_folder``) or what a list
# or an upload gives; every hit carries its key, so the key's length is part of every answer's
# size (:mod:`service.budget`).
MAX_KEY_LENGTH = 512
# A folder name (``scan_folder`` makes labels of them) holds at most 255 bytes on common file
# systems, so at most 255 characters: every folder-built gallery fits.
MAX_LABEL_LENGTH = 255
# Files over this many bytes are skipped (``--max-bytes``) by every build and add, local or on
# Ray, before they are read.
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


def text_problem(key: str, label: str | None) -> str | None:
    """What is wrong with an item's ``key`` and ``label`` (lengths in characters), or None."""
    if len(key) > MAX_KEY_LENGTH:
        return f"the key {key[:40]!r}... is {len(key):,} characters long; the limit is " \
               f"{MAX_KEY_LENGTH:,}"  # fmt: skip
    if label is not None and len(label) > MAX_LABEL_LENGTH:
        return f"the label {label[:40]!r}... is {len(label):,} characters long; the limit " \
               f"is {MAX_LABEL_LENGTH:,}"  # fmt: skip
    return None
