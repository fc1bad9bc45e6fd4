"""``diml explain`` end to end, on real photos where the CUB subset is present."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import ModelConfig, create_model, save_checkpoint
from model.network import DEFAULT_STRUCTURAL_WEIGHT
from service.cli import main


def _unseen_pair(cub_dev: Path) -> list[Path]:
    """Two photos of species 25 (of the test species 21-30, never trained or calibrated on)."""
    labels = dict(
        line.split() for line in (cub_dev / "image_class_labels.txt").read_text().splitlines()
    )
    names = [line.split() for line in (cub_dev / "images.txt").read_text().splitlines()]
    return [cub_dev / "images" / name for image_id, name in names if labels[image_id] == "25"][:2]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model of the trained kind: a 64-d projection head (changed from its initialisation,
    bias included), re-ranking weight 0.5 and score bands."""
    model = create_model(ModelConfig(dim=64, grid=4))
    with torch.no_grad():
        model.head.proj.weight.add_(0.01 * torch.randn_like(model.head.proj.weight))
        model.head.proj.bias.add_(0.1)
    path = tmp_path_factory.mktemp("trained") / "trained.safetensors"
    save_checkpoint(model, path, model.config.with_structural_weight(0.5, (0.6, 0.8)))
    return path


@pytest.mark.parametrize("trained", [False, True], ids=["default", "trained"])
def test_explain_json_accounts_for_the_whole_score(
    cub_dev: Path,
    trained: bool,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    a, b = _unseen_pair(cub_dev)
    out = tmp_path / "pair.png"
    extra = ["--checkpoint", str(request.getfixturevalue("trained_checkpoint"))] if trained else []
    code = main(["explain", str(a), str(b), "--json", "--out", str(out), *extra])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["grid"] == 4
    assert data["epsilon"] == 0.05
    assert len(data["plan"]) == 16
    weight = data["structural_weight"]
    assert weight == (0.5 if trained else DEFAULT_STRUCTURAL_WEIGHT)
    terms = {
        "global": data["global_similarity"],
        "structural": data["structural_similarity"],
        "total": data["score"],
    }
    c = data["contributions"]
    for term, value in terms.items():
        for side in ("query", "result"):
            assert len(c[term][side]) == 16
            assert sum(c[term][side]) == pytest.approx(value, abs=1e-4), (term, side)
            assert abs(c["residual"][side]) < 1e-5
    assert c["exact"] is True
    assert data["score"] == pytest.approx(terms["global"] + weight * terms["structural"], abs=1e-9)
    assert data["verdict"] in ("close", "related", "unrelated")
    assert data["ranked_by"] == ("re-ranked by structural matching (weight 0.5)" if trained
                                 else "ranked by global similarity")  # fmt: skip
    assert sum(map(sum, data["plan"])) == pytest.approx(1.0, abs=1e-4)
    assert data["sinkhorn"]["converged"] is True
    width, height = Image.open(a).size
    assert max(box[2] for box in data["query_regions"]) <= width + 1e-6
    assert max(box[3] for box in data["query_regions"]) <= height + 1e-6
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.height > 320


def test_explain_table_and_same_class_scores_higher(
    cub_dev: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = (cub_dev / "images.txt").read_text().split("\n")
    labels = dict(
        line.split()
        for line in (cub_dev / "image_class_labels.txt").read_text().split("\n")
        if line
    )
    by_class: dict[str, list[Path]] = {}
    for line in lines:
        if line.strip():
            image_id, name = line.split()
            by_class.setdefault(labels[image_id], []).append(cub_dev / "images" / name)
    albatross, other = by_class["1"], by_class["20"]
    scores = []
    for b in (albatross[1], other[0]):
        assert main(["explain", str(albatross[0]), str(b)]) == 0
        table = capsys.readouterr().out
        assert "query part" in table
        scores.append(float(table.split("score")[1].split()[0]))
    assert scores[0] > scores[1]  # same species beats another species


def test_missing_and_unreadable_images_exit_2_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert main(["explain", str(tmp_path / "absent.jpg"), str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "absent.jpg: no such file" in err
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    assert main(["explain", str(tmp_path / "ok.png"), str(text)]) == 2
    assert "notes.txt: not a readable image" in capsys.readouterr().err


def test_a_bad_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    image = str(tmp_path / "ok.png")
    assert main(["explain", image, image, "--checkpoint", str(tmp_path / "none.safetensors")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the message on a machine without CUDA"
)
def test_a_missing_device_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    image = str(tmp_path / "ok.png")
    assert main(["explain", image, image, "--device", "cuda"]) == 2
    assert "no CUDA device is available here" in capsys.readouterr().err
    assert main(["explain", image, image, "--device", "tpu7"]) == 2
    assert "not a device" in capsys.readouterr().err


@pytest.mark.slow
def test_the_console_script_is_installed(tmp_path: Path) -> None:
    diml = Path(sys.executable).with_name("diml")
    if not diml.exists():
        pytest.skip("the project is not installed in this interpreter's environment")
    result = subprocess.run(
        [str(diml), "explain", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "a.jpg: no such file" in result.stderr
    assert "Traceback" not in result.stderr
