"""``diml serve`` refuses to start on settings that could not work (exit 2, one line naming the
fix), and a service whose loading failed says so rather than asking clients to retry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main
from service.settings import Settings

Started = list[tuple[object, Settings, str, int]]


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Started:
    """``diml serve`` runs here up to the server, which is not started: its calls are kept."""
    calls: Started = []
    monkeypatch.setattr("service.server.serve", lambda *args: calls.append(args))
    for name in ("DIML_INDEX", "DIML_GALLERY", "DIML_UPLOADS", "DIML_READ_KEYS"):
        monkeypatch.delenv(name, raising=False)
    return calls


def _refusal(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diml serve: ")
    return err


def test_settings_that_cannot_take_effect_refuse_to_start(
    served: dict[str, Path], started: Started, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    base = ["--index", str(served["index"]), "--checkpoint", str(served["checkpoint"])]
    monkeypatch.setenv("DIML_PROTECT_METRICS", "true")
    assert "DIML_PROTECT_METRICS needs DIML_READ_KEYS" in _refusal(base, capsys)
    monkeypatch.delenv("DIML_PROTECT_METRICS")
    monkeypatch.setenv("DIML_WRITE_KEYS", "w")
    monkeypatch.setenv("DIML_ANONYMOUS_WRITES", "loopback")
    assert "DIML_ANONYMOUS_WRITES=loopback applies only" in _refusal(base, capsys)
    monkeypatch.delenv("DIML_WRITE_KEYS")
    monkeypatch.delenv("DIML_ANONYMOUS_WRITES")
    err = _refusal([*base, "--device", "gpu"], capsys)
    assert "--device (DIML_DEVICE) 'gpu': not a device; use cpu, cuda or cuda:N" in err
    assert started == []


def test_paths_and_devices_that_are_not_there_refuse_to_start(
    served: dict[str, Path], started: Started, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    checkpoint = ["--checkpoint", str(served["checkpoint"])]
    new, a_file = tmp_path / "new.index", tmp_path / "file"
    a_file.write_text("not a folder")
    err = _refusal(["--index", str(new), "--gallery", str(tmp_path / "photos"), *checkpoint],
                   capsys)  # fmt: skip
    assert f"--gallery {tmp_path / 'photos'} (DIML_GALLERY) does not exist" in err
    assert "diml index build --images PHOTOS" in err
    err = _refusal(["--index", str(new), "--gallery", str(a_file), *checkpoint], capsys)
    assert "is not a folder" in err
    err = _refusal(["--index", str(a_file), *checkpoint], capsys)
    assert f"--index {a_file} (DIML_INDEX) is a file" in err
    err = _refusal(["--index", str(served["index"]), "--checkpoint", str(tmp_path / "c")], capsys)
    assert "no such checkpoint file" in err
    monkeypatch.setenv("DIML_UPLOADS", str(a_file))
    err = _refusal(["--index", str(served["index"]), *checkpoint], capsys)
    assert "DIML_UPLOADS" in err
    assert "is a file" in err
    assert started == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing was created


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_without_cuda_refuses_to_start(
    served: dict[str, Path], started: Started, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--index", str(served["index"]), "--checkpoint", str(served["checkpoint"])]
    assert "no CUDA device is available here" in _refusal([*args, "--device", "cuda"], capsys)
    assert started == []


def test_settings_that_work_start_the_server(
    served: dict[str, Path], started: Started, tmp_path: Path
) -> None:
    # The gallery is read only on the first start: once the index exists, a missing one is fine.
    args = ["--index", str(served["index"]), "--checkpoint", str(served["checkpoint"]),
            "--gallery", str(tmp_path / "gone"), "--port", "8765"]  # fmt: skip
    assert main(["serve", *args]) == 0
    [(_, settings, host, port)] = started
    assert (settings.index, host, port) == (str(served["index"]), "127.0.0.1", 8765)


def test_a_failed_load_is_not_reported_as_loading(served: dict[str, Path], tmp_path: Path) -> None:
    # The gallery goes missing after start-up's checks: indexing it fails, for good.
    settings = Settings(index=tmp_path / "new.index", gallery=tmp_path / "photos",
                        checkpoint=served["checkpoint"])  # fmt: skip
    with TestClient(create_app(settings, load_in_background=False)) as client:
        searched = client.post("/search", files={"image": ("q.png", b"x")})
        ready = client.get("/readyz")
    assert searched.status_code == 503
    assert searched.json()["error"]["code"] == "load_failed"
    message = searched.json()["error"]["message"]
    assert message.startswith("indexing the gallery (first start) failed")
    assert "restart" in message
    assert "retry" not in message
    assert "retry-after" not in searched.headers
    assert str(tmp_path) not in searched.text
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "load_failed"  # /readyz says so too, no retry
    assert "retry-after" not in ready.headers
    assert not (tmp_path / "new.index").exists()
