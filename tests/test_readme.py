"""The README's examples hold: its Python examples run as written, on the embedded gallery's
photos (the evaluation example on the CUB development subset, its names swapped for what exists
here), and its `diml explain` table is what the command prints. The `/search` example is checked
against the service in tests/service/test_embedded_gallery.py."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from index_builder import build_index, scan_folder
from model import Embedder, load_model, save_checkpoint
from model.datasets import read_dataset
from service.cli import main
from tests.conftest import REPO


def python_examples() -> list[str]:
    """The README's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def run(code: str, folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(folder)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    return namespace


def example(word: str) -> str:
    """The one Python example that contains ``word``."""
    found = [code for code in python_examples() if word in code]
    assert len(found) == 1, f"expected one README Python example with {word!r}, found {len(found)}"
    return found[0]


def test_the_readme_has_the_examples_this_file_runs() -> None:
    assert len(python_examples()) == 3


def test_the_explanation_example_writes_its_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(REPO / "gallery" / "cat" / "cat-photo.jpg", tmp_path / "a.jpg")
    shutil.copy(REPO / "gallery" / "cat" / "cat-crop.jpg", tmp_path / "b.jpg")
    found = run(example("render_explanation(a, b"), tmp_path, monkeypatch)
    explanation = found["explanation"]
    assert len(explanation.matches) == 5
    contributions = sum(m.contribution for m in explanation.matches)
    assert 0 < contributions <= explanation.structural_similarity + 1e-6
    assert (tmp_path / "pair.png").read_bytes().startswith(b"\x89PNG")


def test_the_index_example_ranks_by_the_models_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_index(scan_folder(REPO / "gallery"), tmp_path / "gallery.index", Embedder(load_model()))
    shutil.copy(REPO / "gallery" / "cat" / "cat-small.jpg", tmp_path / "query.jpg")
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
        '"CUB_200_2011"': repr(str(cub_dev)),
        '"101-200"': '"21-22"',
        '"runs/ms-diml/best.safetensors"': '"model.safetensors"',
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
    cub_dev: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (REPO / "README.md").read_text()
    shown = re.search(r"\$ \.venv/bin/diml explain (\S+) (\S+)\n(.*?)```", readme, re.S)
    assert shown is not None, "the README's diml explain example is gone"
    first, second, printed = shown.groups()
    folder = next(cub_dev.glob(f"images/*/{first}")).parent
    monkeypatch.chdir(folder)
    assert main(["explain", first, second]) == 0
    got = capsys.readouterr().out.strip().splitlines()
    want = printed.strip().splitlines()
    assert len(got) == len(want)
    for got_line, want_line in zip(got, want, strict=True):
        # The same words and parts; values to within the last digit or two shown (ONNX Runtime
        # and PyTorch, or two CPUs, may differ there).
        assert re.sub(r"[-+]?[\d.]+", "#", got_line) == re.sub(r"[-+]?[\d.]+", "#", want_line)
        np.testing.assert_allclose(_numbers(got_line), _numbers(want_line), atol=2e-3)
