"""The ``diml`` command: one entry point whose subcommands come from each package."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from index_builder.cli import add_index
from model import configure_decoders
from model.cli import add_explain
from model.train_cli import add_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diml",
        description="Interpretable image retrieval by structural matching (DIML).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and details")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_explain(commands)
    add_training(commands)
    add_index(commands)
    add_serve(commands)
    return parser


def add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "serve",
        help="run the HTTP service",
        description="Serve /search, /explain, /gallery, /healthz, /readyz, /metrics and /docs. "
        "Every setting can also come from the environment (DIML_INDEX, DIML_CHECKPOINT, "
        "DIML_DEVICE, DIML_READ_KEYS, DIML_WRITE_KEYS, DIML_MAX_UPLOAD_BYTES, ...).",
    )
    p.add_argument("--index", help="the index: a folder, qdrant://HOST[:PORT]/COLLECTION or "
                   "qdrant-local:PATH (default $DIML_INDEX or gallery.index)")  # fmt: skip
    p.add_argument(
        "--gallery",
        type=Path,
        help="folder of images to index on the first start, when INDEX holds no index yet "
        "(default $DIML_GALLERY)",
    )
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the default model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from index_builder import index_exists
    from service.app import create_app
    from service.settings import Settings

    overrides = {
        name: value
        for name, value in (
            ("index", args.index),
            ("gallery", args.gallery),
            ("checkpoint", args.checkpoint),
            ("device", args.device),
        )
        if value is not None
    }
    try:
        settings = Settings(**overrides)
        exists = index_exists(settings.location)
    except ValueError as e:  # pydantic's ValidationError says which setting and why
        print(f"diml serve: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a Qdrant server that cannot be reached
        print(f"diml serve: cannot open the index {overrides.get('index', '')}: {e}",
              file=sys.stderr)  # fmt: skip
        return 2
    if settings.gallery is None and not exists:
        print(
            f"diml serve: no index at {settings.index}. Build one with `diml index build "
            f"--images PHOTOS --out {settings.index}`, pass --gallery PHOTOS to index a folder "
            "on the first start, or run `bash docker/entrypoint.sh` for the embedded gallery",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        server_header=False,
        log_level="info",
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_s,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    configure_decoders()
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        print(
            f"\ndiml {args.command}: interrupted; what was committed is kept (an index build "
            "resumes when the same command runs again)",
            file=sys.stderr,
        )
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
