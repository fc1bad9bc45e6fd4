"""Print the results tables of docs/measured.md from the JSON reports of `diml evaluate`.

.venv/bin/python scripts/results_table.py out/cub     (scripts/cub_results.sh runs it)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from model.quantization import stored_bytes

ROWS = {
    "imagenet": "ImageNet MobileNetV2, head-less (no training)",
    "imagenet-g7": "ImageNet MobileNetV2, head-less (no training)",
    "default": "`diml train` default: the whole network + PCA-initialised 512-d head, DIML MS "
    "loss, 30 epochs",
    "tail": "`--train tail`: last stage + PCA-initialised 512-d head (the earlier default)",
    "compact": "`--train tail --dim 128`: the compact model",
    "compact-g7": "`--train tail --dim 128 --grid 7`",
    "head-pca": "`--train head --dim 128`: PCA-initialised head alone",
    "head-random": "`--train head --head-init random --head-lr 1e-3 --dim 128`: the earlier recipe",
}
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "r_precision", "map@r")
MAIN = ("recall@1", "map@r")  # the seed tables' two


def bytes_per_item(report: dict[str, Any]) -> int:
    """What the index stores per image for matching (model.quantization.stored_bytes)."""
    dim, parts = report["dim"], report["grid"] ** 2
    return stored_bytes(parts, dim)


def main(folder: Path) -> None:
    reports: dict[str, dict[str, Any]] = {
        name: json.loads((folder / f"{name}.json").read_text())
        for name in ROWS
        if (folder / f"{name}.json").is_file()
    }
    if not reports:
        raise SystemExit(f"no reports in {folder}; run scripts/cub_results.sh first")
    columns = "R@1 | R@2 | R@4 | R@8 | R-Precision | MAP@R"
    print(f"| model | grid | stored bytes / item | ranking | {columns} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in reports.items():
        rankings = {
            "global": "global",
            "reranked": f"re-ranked top {r['rerank_k']}, model's w = {r['structural_weight']:g}",
            "reranked_published": "(re-ranked, published w = 1)",
        }
        for section, ranking in rankings.items():
            if section not in r:
                continue
            values = " | ".join(f"{r[section][m]:.2f}" for m in METRICS)
            label, grid, size = "", "", ""
            if section == "global":
                label, grid = ROWS[name], f"{r['grid']} x {r['grid']}"
                size = f"{bytes_per_item(r):,}"
            print(f"| {label} | {grid} | {size} | {ranking} | {values} |")
    print()
    print(
        "| model | grid | PCK@0.1 / 0.2: flow (argmax) | flow (weighted mean) | nearest feature "
        "| identity | keypoints | SS drop: top-3 parts / 3 random "
        "| score drop, greyed out: top-3 regions / 3 random |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in reports.items():
        pck, drop = r["pck"], r["deletion"]
        cells = [
            " / ".join(f"{v:.1f}" for v in pck[m])
            for m in ("flow", "flow_mean", "nearest", "identity")
        ]
        print(
            f"| {ROWS[name]} | {r['grid']} x {r['grid']} | {' | '.join(cells)} | "
            f"{pck['n_keypoints']} | "
            f"{drop['top_parts_drop']:.2f}% / {drop['random_parts_drop']:.2f}% | "
            f"{greyed_drop(drop)} |"
        )
    seeds(folder, "default", "`diml train` default")
    seeds(folder, "tail", "`--train tail`")
    seeds(folder, "compact", "`--train tail --dim 128`")
    queries = next(iter(reports.values()))["n_queries"]
    print(f"\n{queries} test queries")


def greyed_drop(deletion: dict[str, Any]) -> str:
    """The image-domain check of the whole score (``deletion.ranking_score``): ``top / random``
    drop, or "n/a" for a report written before it existed (delete it to evaluate again)."""
    greyed = deletion.get("ranking_score")
    if greyed is None:
        return "n/a"
    return f"{greyed['top_drop']:.2f}% / {greyed['random_drop']:.2f}%"


def seeds(folder: Path, name: str, title: str) -> None:
    """A recipe run with other seeds (``SEEDS=...``), beside seed 0: how much one run of the
    same recipe varies on the test classes."""
    runs = {0: folder / f"{name}.json"} | {
        int(p.stem.removeprefix(f"{name}-seed")): p for p in folder.glob(f"{name}-seed*.json")
    }
    if len(runs) < 2 or not runs[0].is_file():
        return
    rows = {seed: json.loads(path.read_text()) for seed, path in sorted(runs.items())}
    print()
    print(f"| {title}, seed | global R@1 / MAP@R | model's w | re-ranked R@1 / MAP@R |")
    print("| --- | --- | --- | --- |")
    for seed, r in rows.items():
        g, rr = r["global"], r["reranked"]
        print(f"| {seed} | {g['recall@1']:.2f} / {g['map@r']:.2f} | {r['structural_weight']:g} | "
              f"{rr['recall@1']:.2f} / {rr['map@r']:.2f} |")  # fmt: skip
    spread = {
        section: " / ".join(mean_sd([r[section][m] for r in rows.values()]) for m in MAIN)
        for section in ("global", "reranked")
    }
    print(f"| mean (sd) | {spread['global']} | | {spread['reranked']} |")


def mean_sd(values: list[float]) -> str:
    """``mean (sample standard deviation)``."""
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.2f} ({sd:.2f})"


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/cub"))
