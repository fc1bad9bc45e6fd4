"""``diml index build | add | remove | info | duplicates | verify``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from index_builder.adding import add_images
from index_builder.build import build_index
from index_builder.duplicates import GLOBAL_THRESHOLD, STRUCTURAL_THRESHOLD, near_duplicates
from index_builder.files import IndexBusyError, write_atomic
from index_builder.interface import FingerprintMismatchError
from index_builder.limits import DEFAULT_MAX_BYTES
from index_builder.location import Location, QdrantLocation, parse_location
from index_builder.manifest import IndexFormatError
from index_builder.opening import open_index, opened
from index_builder.records import Report, Source
from index_builder.sources import SourceListError, read_list, scan_folder
from index_builder.vector_index import VectorIndex
from model import BackboneWeightsError, CheckpointError, Embedder, fingerprint, load_model
from model.cli import add_inference_argument
from model.devices import parse_device

EXIT_FAILED, EXIT_USAGE = 1, 2
LOCATION = "a folder, qdrant://HOST[:PORT]/COLLECTION or qdrant-local:PATH"
EXPECTED = (
    SourceListError,
    IndexFormatError,
    IndexBusyError,
    FingerprintMismatchError,
    CheckpointError,
    BackboneWeightsError,
    ValueError,
    OSError,
)


def add_index(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("index", help="build and maintain a gallery index")
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = sub.add_parser("build", help="index a folder or a list of images (resumable)")
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="a folder; subfolder names become labels")
    src.add_argument("--list", type=Path, help="a CSV with a 'path' column (and 'key', 'label')")
    b.add_argument("--out", type=location_argument, required=True, help=f"the index: {LOCATION}")
    _model_args(b)
    b.add_argument(
        "--factory",
        help="FAISS factory string (default: Flat below 100k items at 128-d, 10k at "
        "1,280-d; IVF above)",
    )
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument(
        "--workers", type=int, help="decoding processes (default: by device and cores; 0 = none)"
    )
    b.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="larger files skip")
    b.add_argument("--report", type=Path, help="also write the build report to this JSON file")
    b.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="decode and embed on Ray (a local Ray, or the cluster at ADDRESS: "
                   "auto, ray://HOST:PORT); --out must be a Qdrant collection")  # fmt: skip
    b.add_argument("--ray-actors", type=int, default=1,
                   help="embedding actors on Ray, each with the model (and a GPU with "
                   "--device cuda); default 1")  # fmt: skip
    b.add_argument("--ray-writers", type=int, metavar="N",
                   help="writer actors on Ray, each adding batches to the collection (0: this "
                   "process writes); default: as many as --ray-actors for a server, 0 for "
                   "qdrant-local:, which one process at a time may open")  # fmt: skip
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(run=run_build)

    a = sub.add_parser("add", help="add image files to an index (all or nothing)")
    a.add_argument("index", type=location_argument, help=LOCATION)
    a.add_argument("files", type=Path, nargs="+")
    a.add_argument("--label", help="label for every added image")
    _model_args(a)
    a.set_defaults(run=run_add)

    r = sub.add_parser("remove", help="remove items by id")
    r.add_argument("index", type=location_argument, help=LOCATION)
    r.add_argument("ids", type=int, nargs="+")
    r.set_defaults(run=run_remove)

    i = sub.add_parser("info", help="what an index holds")
    i.add_argument("index", type=location_argument, help=LOCATION)
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=run_info)

    d = sub.add_parser("duplicates", help="groups of near-copies (crops, mirrors, rescales)")
    d.add_argument("index", type=location_argument, help=LOCATION)
    d.add_argument("--checkpoint", type=Path, help="the model the index was built with "
                   "(default: ImageNet MobileNetV2, head-less)")  # fmt: skip
    d.add_argument("--threshold", type=float, default=GLOBAL_THRESHOLD,
                   help="least global similarity (default %(default)s)")  # fmt: skip
    d.add_argument("--structural-threshold", type=float, default=STRUCTURAL_THRESHOLD,
                   help="least structural similarity (default %(default)s)")  # fmt: skip
    d.add_argument("--json", action="store_true")
    d.set_defaults(run=run_duplicates)

    v = sub.add_parser("verify", help="check an index's consistency (exit 1 on a problem)")
    v.add_argument("index", type=location_argument, help=LOCATION)
    v.add_argument("--checkpoint", type=Path, help="also check it was built by this model")
    v.add_argument("--default-model", action="store_true", help="... or by the default model")
    v.set_defaults(run=run_verify)


def location_argument(text: str) -> Location:
    """An index location from the command line; argparse prints the reason it is not one."""
    try:
        return parse_location(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: ImageNet "
                   "MobileNetV2, head-less)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add_inference_argument(p)


def _embedder(args: argparse.Namespace) -> Embedder:
    device = parse_device(args.device)
    model = load_model(args.checkpoint, device=device)
    return Embedder(model, device, half=device.type == "cuda", runtime=args.inference)


def _fail(command: str, error: Exception, code: int = EXIT_USAGE) -> int:
    print(f"diml index {command}: {error}", file=sys.stderr)
    return code


def _build_on_ray(args: argparse.Namespace, sources: list[Source]) -> Report:
    if not isinstance(args.out, QdrantLocation):
        raise ValueError(
            f"--ray writes to a Qdrant collection, and {args.out} is a folder; give --out "
            "qdrant://HOST[:PORT]/COLLECTION (or qdrant-local:PATH), or leave out --ray"
        )
    from index_builder.ray_build import build_with_ray

    model = load_model(args.checkpoint)
    return build_with_ray(
        sources, args.out, model, args.checkpoint, device=args.device, inference=args.inference,
        batch_size=args.batch_size, max_bytes=args.max_bytes,
        address=None if args.ray == "local" else args.ray, actors=args.ray_actors,
        writers=args.ray_writers,
    )  # fmt: skip


def _check_factory(factory: str | None, dim: int) -> None:
    """Refuse a ``--factory`` that FAISS cannot read before anything is embedded or written:
    the build meets it only at the end, after embedding every image into ``--out``."""
    if factory is not None:
        VectorIndex.create(factory, dim)


def run_build(args: argparse.Namespace) -> int:
    try:
        sources = scan_folder(args.images) if args.images else read_list(args.list)
        if args.ray is not None:
            report = _build_on_ray(args, sources)
        else:
            embedder = _embedder(args)
            _check_factory(args.factory, embedder.model.dim)
            report = build_index(
                sources,
                args.out,
                embedder,
                factory=args.factory,
                batch_size=args.batch_size,
                workers=args.workers,
                max_bytes=args.max_bytes,
                progress=not args.quiet,
            )
    except EXPECTED as e:
        return _fail("build", e)
    data = report.to_dict()
    if args.report:
        write_atomic(args.report, (json.dumps(data, indent=1) + "\n").encode())
    rate = data["images_per_second"]
    print(
        f"indexed {report.indexed} images ({rate} images/s), skipped {len(report.skipped)}, "
        f"{report.count} items in {args.out}"
    )
    for skip in report.skipped[:20]:
        print(f"  skipped {skip['path']}: {skip['reason']}")
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more (see --report)")
    return 0


def run_add(args: argparse.Namespace) -> int:
    try:
        sources = [Source(path.absolute(), path.name, args.label) for path in args.files]
        embedder = _embedder(args)
        with opened(args.index, fingerprint(embedder.model), writable=True) as index:
            report = add_images(index, sources, embedder)
    except EXPECTED as e:
        return _fail("add", e)
    print(f"added {report.indexed} (ids {report.ids}); {report.count} items in {args.index}")
    for skip in report.skipped:
        print(f"  skipped {skip['path']}: {skip['reason']}")
    return 0


def run_remove(args: argparse.Namespace) -> int:
    try:
        with opened(args.index, writable=True) as index:
            removed = index.remove(args.ids)
            count = index.count
    except EXPECTED as e:
        return _fail("remove", e)
    missing = sorted(set(args.ids) - set(removed))
    print(f"removed {len(removed)} items; {count} left")
    if missing:
        print(f"  not in the index: {missing}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    try:
        index = open_index(args.index)
    except EXPECTED as e:
        return _fail("info", e)
    info = index.info()
    index.close()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key in ("path", "count", "backbone", "grid", "dim", "factory", "fingerprint", "created",
                "size_bytes", "bytes_per_item", "segments", "grid_storage", "skipped"):  # fmt: skip
        print(f"{key:>15}: {info[key]}")
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.checkpoint)
        index = open_index(args.index, fingerprint(model))
    except EXPECTED as e:
        return _fail("duplicates", e)
    try:
        groups = near_duplicates(
            index, model.config.matching, args.threshold, args.structural_threshold
        )
        items = index.items([i for g in groups for i in g.ids])
    finally:
        index.close()
    if args.json:
        out = [{"items": [{"id": i, "key": items[i].key, "label": items[i].label} for i in g.ids],
                "pairs": [dataclasses.asdict(p) for p in g.pairs]} for g in groups]  # fmt: skip
        print(json.dumps(out, indent=1))
        return 0
    print(f"{len(groups)} groups of near-copies, {sum(len(g.ids) for g in groups)} items")
    for g in groups:
        print("  " + ", ".join(f"{i} {items[i].key}" for i in g.ids))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        expected = None
        if args.checkpoint or args.default_model:
            expected = fingerprint(load_model(args.checkpoint))
        index = open_index(args.index)
    except EXPECTED as e:
        return _fail("verify", e)
    problems = index.verify(expected)
    count = index.count
    index.close()
    if problems:
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ok: {count} items, counts and checksums agree, sampled items find themselves first")
    return 0
