"""The documentation's examples hold: the Python examples of docs/python.md run as written from
the root of a clone, on the embedded gallery's photos (the evaluation example on the CUB
development subset, with fewer classes and a checkpoint made here), and the `diml explain`
table of docs/cli.md is what the command prints. The README's commands and the HTTP examples
run in tests/test_docs.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_builder import build_index, scan_folder
from model import Embedder, load_model, save_checkpoint
from model.datasets import read_dataset
from service.cli import main
from tests.conftest import REPO

PYTHON_DOC = REPO / "docs" / "python.md"


def python_examples() -> list[str]:
    """The ```python blocks of docs/python.md, in order."""
    return re.findall(r"```python\n(.*?)```", PYTHON_DOC.read_text(), re.S)


def run(code: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run ``code`` in ``folder``, which stands for the root of a clone: it sees the gallery."""
    (folder / "gallery").symlink_to(REPO / "gallery")
    monkeypatch.chdir(folder)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(code, str(PYTHON_DOC), "exec"), namespace)
    return namespace


def example(word: str) -> str:
    """The one Python example that contains ``word``."""
    found = [code for code in python_examples() if word in code]
    assert len(found) == 1, f"expected one Python example with {word!r}, found {len(found)}"
    return found[0]


def test_the_docs_have_the_examples_this_file_runs() -> None:
    assert len(python_examples()) == 3


def test_the_explanation_example_writes_its_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = run(example("render_explanation(a, b"), tmp_path, monkeypatch)
    explanation = found["explanation"]
    assert len(explanation.matches) == 5
    contributions = sum(m.contribution for m in explanation.matches)
    assert 0 < contributions <= explanation.structural_similarity + 1e-6
    assert (tmp_path / "pair.png").read_bytes().startswith(b"\x89PNG")


def test_the_index_example_ranks_by_the_models_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the command the page names before the example makes.
    build_index(scan_folder(REPO / "gallery"), tmp_path / "gallery.index", Embedder(load_model()))
    found = run(example("GalleryIndex.open"), tmp_path, monkeypatch)
    ranked, ids = found["ranked"], found["ids"][0]
    index = found["index"]
    assert sorted(ranked.tolist()) == sorted(ids.tolist())
    # The query's own file is in the gallery: it comes first.
    first = index.table.items([int(ranked[0])])[int(ranked[0])]
    assert Path(first.path or "").name == "cat-small.jpg"
    # The default model's structural weight is 0: re-ranking keeps the global order exactly.
    assert found["model"].config.matching.structural_weight == 0
    np.testing.assert_array_equal(ranked, ids)


def test_the_evaluation_example_reports_what_it_prints(
    cub_dev: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = example("evaluate(")
    swaps = {
        '"../shared/data/cub-dev"': repr(str(cub_dev)),
        '"21-30"': '"21-22"',  # two classes of the ten, for time
        '"runs/cub/best.safetensors"': '"model.safetensors"',  # made below, not trained
    }
    for old, new in swaps.items():
        assert old in code, f"the evaluation example no longer has {old}"
        code = code.replace(old, new)
    save_checkpoint(load_model(), tmp_path / "model.safetensors")
    report = run(code, tmp_path, monkeypatch)["report"]
    assert report["n_queries"] == len(read_dataset(cub_dev, "cub", classes="21-22"))
    assert 0 < report["global"]["map@r"] <= 100
    assert report["reranked"] == report["global"]  # the default model's structural weight is 0
    assert [0 < pck < 100 for pck in report["pck"]["flow"]] == [True, True]  # alpha 0.1, 0.2


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+|\d+", line)]


def test_the_explain_example_is_what_the_command_prints(
    cub_dev: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = (REPO / "docs" / "cli.md").read_text()
    shown = re.search(
        r"\$ birds=(\S+)\n\$ \.venv/bin/diml explain \$birds/(\S+) \$birds/(\S+)\n(.*?)```",
        page,
        re.S,
    )
    assert shown is not None, "the diml explain example of docs/cli.md is gone"
    birds, first, second, printed = shown.groups()
    assert birds.startswith("../shared/data/cub-dev/"), "the example reads the CUB photos"
    folder = cub_dev / birds.removeprefix("../shared/data/cub-dev/")
    assert main(["explain", str(folder / first), str(folder / second)]) == 0
    got = capsys.readouterr().out.strip().splitlines()
    want = printed.strip().splitlines()
    assert len(got) == len(want)
    for got_line, want_line in zip(got, want, strict=True):
        # The same words and parts; values to within the last digit or two shown (ONNX Runtime
        # and PyTorch, or two CPUs, may differ there).
        assert re.sub(r"[-+]?[\d.]+", "#", got_line) == re.sub(r"[-+]?[\d.]+", "#", want_line)
        np.testing.assert_allclose(_numbers(got_line), _numbers(want_line), atol=2e-3)
