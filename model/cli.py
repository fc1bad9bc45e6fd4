"""``diml explain``: the decomposition of one pair, as a table, JSON, or a picture."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from model.backbones import BackboneWeightsError
from model.checkpoint import CheckpointError, load_model
from model.decoding import load_image
from model.devices import parse_device
from model.explain import Explanation
from model.image_limits import ImageLoadError
from model.pipeline import Embedder
from model.render import render_explanation
from model.runtime import RUNTIMES

log = logging.getLogger(__name__)

EXIT_USAGE = 2


def add_explain(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "explain",
        help="explain how image B matches image A, region by region",
        description="Embed two images, match their part grids by optimal transport and print how "
        "each region of A contributes to the whole ranking score (score = global + w x "
        "structural similarity, w the model's weight), and the strongest part matches.",
    )
    p.add_argument("query", type=Path, help="the query image (A)")
    p.add_argument("result", type=Path, help="the image to compare with it (B)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="a trained checkpoint (default: ImageNet MobileNetV2, head-less, 4x4 grid)",
    )
    p.add_argument("--json", action="store_true", help="print the explanation as JSON")
    p.add_argument("--out", type=Path, help="also render the explanation to this PNG file")
    p.add_argument("--top", type=int, default=5, help="strongest matches to show (default 5)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.set_defaults(run=run_explain)


def run_explain(args: argparse.Namespace) -> int:
    try:
        query, result = load_image(args.query), load_image(args.result)
    except ImageLoadError as e:
        print(f"diml explain: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = parse_device(args.device)
        model = load_model(args.checkpoint, device=device)
    except (CheckpointError, BackboneWeightsError, ValueError) as e:
        print(f"diml explain: {e}", file=sys.stderr)
        return EXIT_USAGE
    explanation = Embedder(model, device).explain(query, result, top=args.top)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        render_explanation(query, result, explanation, top=args.top).save(args.out, "PNG")
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=1))
    else:
        print(format_table(explanation, args.query.name, args.result.name))
        if args.out is not None:
            print(f"picture: {args.out}")
    return 0


def format_table(e: Explanation, query_name: str, result_name: str) -> str:
    """The whole score of ``e`` and where it comes from, in words and numbers."""
    w = e.structural_weight
    verdict = f"  verdict: {e.verdict}" if e.verdict else ""
    lines = [
        f"{query_name} vs {result_name}  (grid {e.grid}x{e.grid}, epsilon {e.epsilon:g}; "
        f"{e.ranked_by})",
        f"  score                 {e.score:+.4f}{verdict}",
        f"  = global similarity   {e.global_similarity:+.4f}",
        f"  + {f'{w:g} x structural':<20}{w * e.structural_similarity:+.4f}  (structural "
        f"{e.structural_similarity:+.4f})",
    ]
    if w == 0:
        lines.append("  structural matching does not rank here (weight 0): the flow below shows "
                     "which parts correspond")  # fmt: skip
    lines += ["", "  query region    global  + w x structural  =   total   share of score"]
    score = e.score or 1.0
    q = e.query
    for r in sorted(range(len(q.total)), key=lambda r: -q.total[r])[:8]:
        g = q.global_[r] if q.global_ is not None else float("nan")
        lines.append(f"  {r:>12}  {g:+8.4f}  {w * q.structural[r]:+16.4f}  {q.total[r]:+8.4f}"
                     f"  {100 * q.total[r] / score:14.1f}%")  # fmt: skip
    if len(q.total) > 8:
        rest = sum(sorted(q.total, reverse=True)[8:])
        lines.append(f"  {f'{len(q.total) - 8} others':>12}  {'':8}  {'':16}  {rest:+8.4f}"
                     f"  {100 * rest / score:14.1f}%")  # fmt: skip
    lines.append(f"  {'sum':>12}  {'':8}  {'':16}  {sum(q.total):+8.4f}  (= score)")
    if not e.exact:
        lines.append(f"  note: {max(abs(q.residual), abs(e.result.residual)):.4f} of the score "
                     "is not split: an image's feature map was not at hand")  # fmt: skip
    lines += [
        "",
        "  strongest part matches (structural term)",
        "  query part  result part    flow   similarity  contribution",
    ]
    for m in e.matches:
        lines.append(
            f"  {m.query_region:>10}  {m.result_region:>11}  {m.flow:6.4f}  {m.similarity:+10.4f}"
            f"  {m.contribution:+12.5f}"
        )
    if not e.converged:
        lines.append(
            f"  note: Sinkhorn stopped after {e.iterations} iterations with marginal error "
            f"{e.marginal_error:.2e} (not converged)"
        )
    return "\n".join(lines)


def add_inference_argument(p: argparse.ArgumentParser) -> None:
    """``--inference``: what runs the backbone (:mod:`model.runtime`)."""
    p.add_argument(
        "--inference",
        choices=RUNTIMES,
        default=os.environ.get("DIML_INFERENCE", "auto"),
        help="backbone runtime: auto (ONNX Runtime on the CPU, PyTorch on CUDA), onnx or torch "
        "(default $DIML_INFERENCE or auto)",
    )
