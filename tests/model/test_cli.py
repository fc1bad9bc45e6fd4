"""``diml explain`` end to end, on real photos where the CUB subset is present."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.network import DEFAULT_STRUCTURAL_WEIGHT
from service.cli import main


def test_explain_json_on_two_real_photos(
    cub_images: list[Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "pair.png"
    code = main(["explain", str(cub_images[0]), str(cub_images[1]), "--json", "--out", str(out)])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["grid"] == 4
    assert data["epsilon"] == 0.05
    assert len(data["plan"]) == 16
    structural = data["structural_similarity"]
    assert sum(data["contributions"]["query"]) == pytest.approx(structural, abs=1e-5)
    assert sum(data["contributions"]["result"]) == pytest.approx(structural, abs=1e-5)
    assert sum(map(sum, data["plan"])) == pytest.approx(1.0, abs=1e-4)
    weight = data["structural_weight"]
    assert weight == DEFAULT_STRUCTURAL_WEIGHT  # the default model's calibrated weight
    assert data["score"] == pytest.approx(data["global_similarity"] + weight * structural, abs=1e-9)
    assert data["sinkhorn"]["converged"] is True
    width, height = Image.open(cub_images[0]).size
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
