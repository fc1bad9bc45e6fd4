from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CheckpointError,
    fingerprint,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from model.config import ModelConfig
from model.network import create_model


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = create_model(ModelConfig(dim=32, grid=4), weights=None)
    with torch.no_grad():
        model.head.proj.weight.add_(torch.randn_like(model.head.proj.weight))
    path = tmp_path / "model.safetensors"
    save_checkpoint(model, path)
    return path, model


def test_round_trip_gives_the_same_model_and_fingerprint(
    trained: tuple[Path, torch.nn.Module],
) -> None:
    path, model = trained
    loaded = load_checkpoint(path)
    assert loaded.config == model.config
    assert fingerprint(loaded) == fingerprint(model)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x).parts, model.eval()(x).parts)
    assert read_config(path) == model.config


def test_a_checkpoint_can_carry_other_matching_settings_only(
    trained: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    _, model = trained
    calibrated = model.config.with_structural_weight(0.3)
    path = tmp_path / "calibrated.safetensors"
    fp = save_checkpoint(model, path, calibrated)
    loaded = load_checkpoint(path)  # verifies the fingerprint
    assert loaded.config == calibrated
    assert fingerprint(loaded) == fp != fingerprint(model)
    assert model.config.matching.structural_weight == 1.0  # the saved model is untouched
    with pytest.raises(ValueError, match="only in matching settings: dim"):
        save_checkpoint(model, tmp_path / "other.safetensors", ModelConfig(dim=16, grid=4))


def test_score_bands_travel_with_the_checkpoint_but_not_in_its_fingerprint(
    trained: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """Bands only present a score: calibrating them keeps every index built with the model."""
    _, model = trained
    banded = model.config.with_structural_weight(1.0, (0.4, 0.7))
    path = tmp_path / "banded.safetensors"
    fp = save_checkpoint(model, path, banded)
    loaded = load_checkpoint(path)
    assert loaded.config.matching.related_score == 0.4
    assert loaded.config.matching.close_score == 0.7
    assert fp == fingerprint(loaded) == fingerprint(model)


def test_the_default_models_fingerprint_is_unchanged_by_its_bands() -> None:
    from model.config import identity_json
    from model.network import default_config

    config = default_config()
    assert config.matching.close_score is not None
    bare = ModelConfig.from_dict(
        {**config.to_dict(), "matching": {"structural_weight": 0.0}}
    )  # as it was saved before bands existed
    text = identity_json(config.to_json())
    assert text == identity_json(bare.to_json())
    assert "close_score" not in text
    assert "related_score" not in text


def test_fingerprint_changes_with_weights_and_config() -> None:
    a = create_model(ModelConfig(dim=32), weights=None)
    b = create_model(ModelConfig(dim=32, grid=7), weights=None)
    assert fingerprint(a) != fingerprint(b)
    before = fingerprint(a)
    with torch.no_grad():
        a.head.proj.bias[0] += 1e-3
    assert fingerprint(a) != before


def test_a_mismatching_config_is_named(trained: tuple[Path, torch.nn.Module]) -> None:
    path, _ = trained
    with pytest.raises(CheckpointError, match=r"grid: 4 != 7") as e:
        load_checkpoint(path, expected=ModelConfig(dim=32, grid=7))
    assert "dim" not in str(e.value)


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)


def test_weights_that_do_not_fit_the_stored_config_are_refused(
    trained: tuple[Path, torch.nn.Module],
) -> None:
    path, _ = trained
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    config = json.loads(meta["config"])
    config["dim"] = 64
    meta["config"] = json.dumps(config)
    _rewrite(path, load_file(str(path)), meta)
    with pytest.raises(CheckpointError, match="do not fit the stored config"):
        load_checkpoint(path)


def test_edited_weights_fail_the_fingerprint(trained: tuple[Path, torch.nn.Module]) -> None:
    path, _ = trained
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path))
    tensors["head.proj.bias"] = tensors["head.proj.bias"] + 1
    _rewrite(path, tensors, meta)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        load_checkpoint(path)


def test_files_that_are_not_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CheckpointError, match="not a DIML checkpoint"):
        load_checkpoint(plain)


def test_save_is_atomic_and_leaves_no_temporary_files(
    trained: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, model = trained
    before = path.read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("model.checkpoint.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
