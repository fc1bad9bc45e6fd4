"""Gallery writes through the service: add uploads (all or nothing), remove an item, and
sweep the uploads folder of files that no live item holds."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from index_builder import Decoded, Embedded, IndexBusyError, Item, Source, add_embedded
from index_builder.embedding import with_embedding
from index_builder.files import write_atomic, writer_lock
from index_builder.location import QdrantLocation
from model import Embedding, ModelInput
from service.failures import NotFoundError, ReadOnlyError
from service.gallery import Gallery
from service.limits import in_thread
from service.settings import Settings

log = logging.getLogger(__name__)
_SHA256 = re.compile(r"[0-9a-f]{64}")
# model.files.replacing writes beside the file as .NAME.RANDOM.tmp, renamed when complete.
_UPLOAD_TEMP = re.compile(r"\.[0-9a-f]{64}\.[^/]*\.tmp")
# (name, bytes) of each upload
Uploads = list[tuple[str, bytes]]
Added = tuple[list[Item], list[dict[str, str]], int]


def claim_writes(settings: Settings, stack: contextlib.ExitStack) -> bool:
    """Whether this process may write the gallery: writes are allowed and, for a folder (one
    writer at a time), its writer lock is taken, held until ``stack`` closes. A Qdrant
    collection takes writes from every replica of the API."""
    if not settings.allow_writes:
        return False
    try:
        if not isinstance(settings.location, QdrantLocation):
            stack.enter_context(writer_lock(settings.location, create=False))
    except IndexBusyError:
        log.warning("%s is locked by another writer: serving read-only", settings.index)
        return False
    return True


class Writes:
    """Changes to ``gallery``, which refuse with ReadOnlyError unless ``writable``. Uploads are
    decoded by ``decode`` and embedded by ``embed`` (the engine's shared batcher)."""

    def __init__(
        self,
        gallery: Gallery,
        settings: Settings,
        writable: bool,
        decode: Callable[[bytes, str], ModelInput],
        embed: Callable[[list[ModelInput]], Awaitable[Embedding]],
    ) -> None:
        self.gallery, self.settings, self.writable = gallery, settings, writable
        self.decode, self.embed = decode, embed

    async def add(self, uploads: Uploads, key: str | None, label: str | None) -> Added:
        """Add uploads to the gallery: all or nothing. Returns (added items, skipped, count).

        Every upload is decoded once, then embedded through the shared batcher, a batch at a
        time, so searches keep their turn; the index lock is taken only to commit. One upload
        that is not a usable image refuses the whole request (its error names it) and
        nothing is written; bytes already in the gallery (or repeated) are skipped and listed.
        """
        if not self.writable:
            raise ReadOnlyError
        sources = await in_thread(_sources, uploads, self.settings.uploads_dir, key, label)
        embedded: list[Embedded] = []
        step = self.settings.max_batch_images
        for start in range(0, len(uploads), step):
            chunk = uploads[start : start + step]
            inputs = [await in_thread(self.decode, data, name) for name, data in chunk]
            embedding = await self.embed(inputs)
            chosen = zip(sources[start : start + step], inputs, strict=True)
            decoded = [_decoded(source, m) for source, m in chosen]
            embedded += with_embedding(decoded, embedding).embedded()
        return await in_thread(self.commit, uploads, embedded)

    def commit(self, uploads: Uploads, embedded: list[Embedded]) -> Added:
        """Keep each new upload's bytes (its ``embedded`` source's path, ``uploads/<sha256>``)
        and add them in one step. Bytes already in the gallery get no file; the files this
        call wrote are deleted again when the add fails."""
        self.settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        written = []
        gallery = self.gallery
        with gallery.lock:
            known = gallery.index.keys_by_sha256(e.sha256 for e in embedded)  # skipped: no file
            try:
                for (_, data), e in zip(uploads, embedded, strict=True):
                    path = e.source.path
                    if e.sha256 not in known and not path.exists():
                        write_atomic(path, data)
                        written.append(path)
                report = add_embedded(gallery.index, embedded)
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            if gallery.device_search is not None:
                gallery.device_search.add(report.ids)
            gallery.changes += 1
            added = gallery.index.items(report.ids)
            count = gallery.index.count
        names = {str(e.source.path): name for (name, _), e in zip(uploads, embedded, strict=True)}
        skipped = [{"filename": names.get(s["path"], ""), "reason": s["reason"]}
                   for s in report.skipped]  # fmt: skip
        return [added[i] for i in report.ids], skipped, count

    def remove(self, item_id: int) -> int:
        """Remove one item; the number of items left. NotFoundError when there is none."""
        if not self.writable:
            raise ReadOnlyError
        gallery = self.gallery
        with gallery.lock:
            if not gallery.index.remove([item_id]):
                raise NotFoundError(f"no gallery item with id {item_id}")
            if gallery.device_search is not None:
                gallery.device_search.remove([item_id])
            gallery.changes += 1
            return gallery.index.count

    def sweep_uploads(self) -> None:
        """Delete files under ``uploads/`` that no live item holds: an add killed between
        writing its files and committing, or items removed since. A Qdrant collection's
        uploads folder is shared by the replicas of the API: it is never swept."""
        folder = self.settings.uploads_dir
        if isinstance(self.settings.location, QdrantLocation) or not folder.is_dir():
            return
        for f in folder.iterdir():  # an upload's atomic write cut short (kill -9)
            if f.is_file() and _UPLOAD_TEMP.fullmatch(f.name):
                log.info("removing %s: an upload's write that never finished", f)
                f.unlink(missing_ok=True)
        files = [f for f in folder.iterdir() if f.is_file() and _SHA256.fullmatch(f.name)]
        live = self.gallery.index.keys_by_sha256(f.name for f in files)
        for f in files:  # only files this service wrote: named by the sha256 of their bytes
            if f.name not in live and hashlib.sha256(f.read_bytes()).hexdigest() == f.name:
                log.info("removing %s: no gallery item holds it", f)
                f.unlink(missing_ok=True)


def _sources(uploads: Uploads, folder: Path, key: str | None, label: str | None) -> list[Source]:
    """Each upload as a source to index: its bytes kept as ``folder/<sha256>``; its key
    ``key`` alone, ``key-i`` for one of several, else the upload's file name."""
    keys = [name if not key else key if len(uploads) == 1 else f"{key}-{i}"
            for i, (name, _) in enumerate(uploads)]  # fmt: skip
    return [Source(folder / hashlib.sha256(data).hexdigest(), item_key, label)
            for (_, data), item_key in zip(uploads, keys, strict=True)]  # fmt: skip


def _decoded(source: Source, decoded: ModelInput) -> Decoded:
    """An upload's source (named by the sha256 of its bytes) and what the service decoded."""
    size = decoded.geometry.width, decoded.geometry.height
    return Decoded(source, decoded.pixels, source.path.name, *size)
