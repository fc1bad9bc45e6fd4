"""kill -9 at random moments while clients add, delete and search: no acknowledged write lost.

    .venv/bin/python bench/crash_test.py [--kills 100] [--clients 4] [--seed 0] [--json out.json]
                                         [--index DIR] [--checkpoint FILE]

A real ``diml serve`` runs on a copy of an index (by default the embedded gallery's, built by
the default model on the first run). In each round, ``--clients`` threads send a mix of adds
(a new picture each), deletes (of items known to be there) and searches; after a random 0.2 to
2.5 s the server is killed with SIGKILL, then restarted on the same index, and the gallery is
read back whole. Every answer a client got is a promise the restarted server must keep:

- an acknowledged add (201) is present with its bytes (the image it serves has the sha256 sent);
- an acknowledged delete (200) is absent; a refused add (4xx/5xx) is absent;
- an add or delete whose answer never came (the kill cut it) is absent or complete: its item is
  listed, serves its bytes and can be searched by id, or it is nowhere; a delete cut short left
  the item there or not, and it stays as the restart found it;
- the count the server reports equals the items it lists, and ``uploads/`` holds exactly the
  files of listed uploads (an add cut short leaves no orphan behind);
- no request is answered with a server error (5xx other than 503), and deleting an item that is
  there succeeds.

Prints one line per round and a summary; exits 1 on any broken promise. About 6 s a round on
2 cores with the default model (2.8 s of it the restart).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.live_server import Server  # noqa: E402 - the runner lives with the tests


def new_picture(rng: np.random.Generator, size: int = 96) -> bytes:
    """A PNG no one has sent before: smooth random colour fields (a real model embeds them to
    distinct points; plain noise would all land in one place)."""
    small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Ledger:
    """What the clients were told, and what is therefore owed after a restart."""

    present: dict[int, str] = field(default_factory=dict)  # id -> sha256, acknowledged
    deleted: set[int] = field(default_factory=set)  # acknowledged deletes
    never: set[str] = field(default_factory=set)  # sha256 of adds refused or found absent
    cut_adds: list[str] = field(default_factory=list)  # this round's adds without an answer
    cut_deletes: list[int] = field(default_factory=list)  # this round's deletes without one
    in_flight: set[int] = field(default_factory=set)  # ids being deleted now
    errors: list[str] = field(default_factory=list)  # server errors (5xx other than 503)
    counts: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(
    url: str, ledger: Ledger, seed: int, queries: list[bytes], stop: threading.Event
) -> None:
    """One client's mix until ``stop``: 40 % adds, 20 % deletes, 40 % searches."""
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            roll = rng.random()
            try:
                if roll < 0.4:
                    _add(http, ledger, new_picture(rng))
                elif roll < 0.6:
                    _delete(http, ledger, rng)
                else:
                    query = queries[int(rng.integers(len(queries)))]
                    r = http.post("/search", files={"image": ("q.jpg", query)},
                                  params={"k": 5})  # fmt: skip
                    with ledger.lock:
                        ledger.counts[f"search {r.status_code}"] += 1
                        if r.status_code >= 500 and r.status_code != 503:
                            ledger.errors.append(f"search answered {r.status_code}: {r.text[:200]}")
            except httpx.TransportError:
                if stop.is_set() or not _alive(http):
                    return  # the server is gone: the round is over for this client


def _alive(http: httpx.Client) -> bool:
    try:
        http.get("/healthz", timeout=1)
        return True
    except httpx.TransportError:
        return False


def _add(http: httpx.Client, ledger: Ledger, data: bytes) -> None:
    digest = sha(data)
    try:
        r = http.post("/gallery", files={"images": ("new.png", data)}, data={"label": "crash"})
    except httpx.TransportError:
        with ledger.lock:
            ledger.cut_adds.append(digest)
            ledger.counts["add cut"] += 1
        raise
    with ledger.lock:
        if r.status_code == 201:
            (item,) = r.json()["added"]
            assert item["sha256"] == digest, item
            ledger.present[item["id"]] = digest
            ledger.counts["add acknowledged"] += 1
        else:
            ledger.never.add(digest)
            ledger.counts[f"add refused {r.status_code}"] += 1
            if r.status_code >= 500 and r.status_code != 503:
                ledger.errors.append(f"add answered {r.status_code}: {r.text[:200]}")


def _delete(http: httpx.Client, ledger: Ledger, rng: np.random.Generator) -> None:
    with ledger.lock:
        choices = sorted(set(ledger.present) - ledger.in_flight)
        if not choices:
            return
        item_id = choices[int(rng.integers(len(choices)))]
        ledger.in_flight.add(item_id)
    try:
        r = http.delete(f"/gallery/{item_id}")
    except httpx.TransportError:
        with ledger.lock:
            ledger.cut_deletes.append(item_id)
            ledger.counts["delete cut"] += 1
        raise
    finally:
        with ledger.lock:
            ledger.in_flight.discard(item_id)
    with ledger.lock:
        if r.status_code == 200:
            ledger.present.pop(item_id, None)
            ledger.deleted.add(item_id)
            ledger.counts["delete acknowledged"] += 1
        else:
            ledger.counts[f"delete refused {r.status_code}"] += 1
            ledger.errors.append(f"delete of a present item answered {r.status_code}")


def listing(http: httpx.Client) -> dict[int, str]:
    """Every item the server lists: id -> sha256."""
    items: dict[int, str] = {}
    offset = 0
    while True:
        page = http.get("/gallery", params={"offset": offset, "limit": 500}).json()
        items.update({i["id"]: i["sha256"] for i in page["items"]})
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return items


def complete(http: httpx.Client, item_id: int, digest: str) -> bool:
    """The item serves the bytes that were sent, and can be searched by."""
    image = http.get(f"/gallery/{item_id}/image")
    found = http.post(f"/search/by-id/{item_id}", params={"k": 1, "explain": "false"})
    return image.status_code == 200 and sha(image.content) == digest and found.status_code == 200


def settle(http: httpx.Client, ledger: Ledger, uploads: Path, count: int) -> list[str]:
    """Check every promise against the restarted server; fold this round's cut requests into
    the ledger as the server resolved them. Returns the broken promises."""
    broken: list[str] = []
    listed = listing(http)
    by_sha = {digest: i for i, digest in listed.items()}
    if count != len(listed):
        broken.append(f"/readyz counts {count} items, /gallery lists {len(listed)}")
    cut = set(ledger.cut_deletes)
    for item_id, digest in ledger.present.items():
        if item_id not in cut and listed.get(item_id) != digest:
            broken.append(f"acknowledged add {item_id} ({digest[:12]}) is missing")
    broken += [f"acknowledged delete {i} is back" for i in ledger.deleted if i in listed]
    broken += [f"refused or lost add {d[:12]} appeared" for d in ledger.never if d in by_sha]
    for digest in ledger.cut_adds:
        if digest not in by_sha:
            ledger.never.add(digest)
            ledger.counts["cut add absent"] += 1
        elif complete(http, by_sha[digest], digest):
            ledger.present[by_sha[digest]] = digest
            ledger.counts["cut add complete"] += 1
        else:
            broken.append(f"add cut short left item {by_sha[digest]} half-made")
    for item_id in ledger.cut_deletes:
        if item_id in listed:
            ledger.counts["cut delete undone"] += 1  # still present: it stays in `present`
        else:
            ledger.present.pop(item_id, None)
            ledger.deleted.add(item_id)
            ledger.counts["cut delete done"] += 1
    ledger.cut_adds.clear()
    ledger.cut_deletes.clear()
    files = {f.name for f in uploads.iterdir()} if uploads.is_dir() else set()
    orphans = files - set(listed.values())
    broken += [f"orphan upload {name[:12]}" for name in sorted(orphans)]
    for item_id, digest in sorted(ledger.present.items())[-5:]:  # the newest still serve bytes
        if not complete(http, item_id, digest):
            broken.append(f"item {item_id} no longer serves its bytes")
    return broken


def add_index_args(parser: argparse.ArgumentParser, json_help: str) -> None:
    """The options this script and ``bench/soak.py`` share: the index, the model, the output."""
    parser.add_argument("--index", type=Path, help="index to start from (copied; default: the "
                        "embedded gallery's, built by the default model)")  # fmt: skip
    parser.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the default)")
    parser.add_argument("--json", type=Path, help=json_help)


@contextlib.contextmanager
def scratch_index(args: argparse.Namespace) -> Iterator[Path]:
    """A copy of ``--index`` (or of the embedded gallery indexed by ``--checkpoint``) for the
    run to change, deleted afterwards."""
    with tempfile.TemporaryDirectory(prefix="diml-bench-") as work:
        index = Path(work) / "index"
        if args.index is not None:
            shutil.copytree(args.index, index)
        else:
            command = [sys.executable, "-m", "service.cli", "index", "build",
                       "--images", str(REPO / "gallery"), "--out", str(index)]  # fmt: skip
            if args.checkpoint:
                command += ["--checkpoint", str(args.checkpoint)]
            subprocess.run(command, check=True, cwd=REPO, capture_output=True)
        yield index


def run(args: argparse.Namespace) -> dict[str, object]:
    with scratch_index(args) as index:
        queries = [p.read_bytes() for p in sorted((REPO / "gallery").rglob("*.jpg"))[:8]]
        ledger = Ledger()
        rng = random.Random(args.seed)
        broken: list[str] = []
        restarts: list[float] = []
        for round_ in range(args.kills):
            start = time.monotonic()
            server = Server(index, args.checkpoint)
            try:
                server.wait_ready()
                restarts.append(time.monotonic() - start)
                if round_:
                    with httpx.Client(base_url=server.url, timeout=30) as http:
                        count = http.get("/readyz").json()["items"]
                        broken += settle(http, ledger, index / "uploads", count)
                stop = threading.Event()
                workers = [threading.Thread(target=client, args=(server.url, ledger,
                           args.seed * 1000 + round_ * 16 + c, queries, stop))
                           for c in range(args.clients)]  # fmt: skip
                for w in workers:
                    w.start()
                time.sleep(rng.uniform(0.2, 2.5))
                server.kill()
                stop.set()
                for w in workers:
                    w.join(timeout=60)
            finally:
                server.stop()
            print(f"round {round_ + 1}/{args.kills}: {len(ledger.present)} items owed, "
                  f"{len(broken)} broken", flush=True)  # fmt: skip
        server = Server(index, args.checkpoint)
        try:
            count = server.wait_ready().json()["items"]
            with httpx.Client(base_url=server.url, timeout=30) as http:
                broken += settle(http, ledger, index / "uploads", count)
        finally:
            server.stop()
    return {
        "kills": args.kills,
        "clients": args.clients,
        "requests": dict(sorted(ledger.counts.items())),
        "acknowledged_items_at_end": len(ledger.present),
        "restart_s_median": float(np.median(restarts)) if restarts else None,
        "broken": broken + ledger.errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    add_index_args(parser, "also write the summary here")
    args = parser.parse_args(argv)
    summary = run(args)
    counts = summary["requests"]
    assert isinstance(counts, dict)
    print(f"\n{args.kills} kill -9 with {args.clients} clients:")
    for name, n in counts.items():
        print(f"  {name:<24} {n:>6}")
    broken = summary["broken"]
    assert isinstance(broken, list)
    print(f"broken promises: {len(broken)}")
    for line in broken[:20]:
        print(f"  {line}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
