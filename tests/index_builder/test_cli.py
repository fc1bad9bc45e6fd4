from __future__ import annotations

import json
from pathlib import Path

import pytest

from model import save_checkpoint
from service.cli import main
from tests.index_builder.helpers import make_images, tiny_embedder


def test_build_info_verify_add_remove_on_real_photos(
    cub_images: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    listing = tmp_path / "list.csv"
    lines = ["path,key,label", *(f"{p},{p.name},bird" for p in cub_images[:4])]
    listing.write_text("\n".join(lines) + "\n")
    out, report = tmp_path / "index", tmp_path / "report.json"
    args = ["index", "build", "--list", str(listing), "--out", str(out), "--quiet"]
    assert main([*args, "--report", str(report), "--workers", "0"]) == 0
    assert "indexed 4 images" in capsys.readouterr().out
    assert json.loads(report.read_text())["count"] == 4

    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 4
    assert info["dim"] == 1280
    assert info["grid"] == 4
    assert info["factory"] == "Flat"
    assert info["bytes_per_item"] > 16 * 1280 * 2  # float16 grids of the head-less default

    assert main(["index", "verify", str(out), "--default-model"]) == 0
    assert "ok: 4 items" in capsys.readouterr().out
    assert main(["index", "add", str(out), str(cub_images[4]), str(cub_images[0])]) == 0
    added = capsys.readouterr().out
    assert "added 1 (ids [4])" in added
    assert "duplicate bytes" in added
    assert main(["index", "remove", str(out), "0", "42"]) == 0
    assert "removed 1 items; 4 left" in capsys.readouterr().out
    assert main(["index", "verify", str(out)]) == 0


def test_errors_are_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["index", "info", str(tmp_path / "absent")]) == 2
    assert "no such index folder" in capsys.readouterr().err
    args = ["index", "build", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "i")]
    assert main(args) == 2
    assert "no such folder of images" in capsys.readouterr().err
    make_images(tmp_path / "g", 3)
    args = ["index", "build", "--images", str(tmp_path / "g"), "--out", str(tmp_path / "i")]
    assert main([*args, "--factory", "Nonsense", "--quiet"]) == 2
    assert "not a FAISS factory string" in capsys.readouterr().err
    assert main([*args, "--factory", "IVF1024,Flat", "--quiet", "--workers", "0"]) == 2
    assert "use --factory Flat" in capsys.readouterr().err


def test_verify_fails_with_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_images(tmp_path / "g", 3)
    out = tmp_path / "i"
    args = ["index", "build", "--images", str(tmp_path / "g"), "--out", str(out), "--quiet"]
    assert main([*args, "--workers", "0"]) == 0
    grids = next((out / (out / "CURRENT").read_text().strip() / "segments").glob("*.grids.npy"))
    data = bytearray(grids.read_bytes())
    data[-1] ^= 0xFF
    grids.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["index", "verify", str(out)]) == 1
    assert "checksum mismatch" in capsys.readouterr().err


def test_failed_commands_leave_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = tmp_path / "tiny.safetensors"
    save_checkpoint(tiny_embedder().model, checkpoint)
    image = make_images(tmp_path / "g", 1)[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    for where in (tmp_path / "absent", empty):
        assert main(["index", "remove", str(where), "1"]) == 2
        assert "build one with `diml index build`" in capsys.readouterr().err
        args = ["index", "add", str(where), str(image), "--checkpoint", str(checkpoint)]
        assert main(args) == 2
        assert "build one with `diml index build`" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()
    assert list(empty.iterdir()) == []  # no .lock
    out = tmp_path / "out"
    args = ["index", "build", "--out", str(out), "--checkpoint", str(checkpoint), "--quiet"]
    assert main([*args, "--images", str(tmp_path / "nope")]) == 2
    assert main([*args, "--images", str(tmp_path / "g"), "--factory", "Nonsense"]) == 2
    assert "not a FAISS factory string" in capsys.readouterr().err
    assert not out.exists()  # refused before a folder, a lock or an embedding was made
