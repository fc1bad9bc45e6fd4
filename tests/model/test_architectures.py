"""The networks of model.architectures are torchvision's, and serving never imports torchvision."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from model.architectures import MobileNetV2, ResNet50

REPO = Path(__file__).resolve().parents[2]
PAIRS = [
    (MobileNetV2, torchvision.models.mobilenet_v2),
    (ResNet50, torchvision.models.resnet50),
]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=["mobilenet_v2", "resnet50"])
def test_same_parameters_and_the_same_random_draw(
    ours: Callable[[], nn.Module], theirs: Callable[[], nn.Module]
) -> None:
    torch.manual_seed(7)
    mine = ours().state_dict()
    torch.manual_seed(7)
    reference = theirs().state_dict()
    assert list(mine) == list(reference)
    different = [k for k in mine if not torch.equal(mine[k], reference[k])]
    assert different == []


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=["mobilenet_v2", "resnet50"])
@pytest.mark.parametrize("training", [False, True])
def test_same_outputs_and_gradients(
    ours: Callable[[], nn.Module], theirs: Callable[[], nn.Module], training: bool
) -> None:
    reference = theirs()
    mine = ours()
    mine.load_state_dict(reference.state_dict())
    for net in (mine, reference):
        net.train(training)
        # BatchNorm statistics that are not ones and zeros, so that eval mode is tested too.
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.fill_(0.1)
                m.running_var.fill_(2.0)
    x = torch.randn(2, 3, 80, 96)
    torch.manual_seed(1)  # the same dropout masks in training mode
    out_mine = mine(x)
    torch.manual_seed(1)
    out_reference = reference(x)
    torch.testing.assert_close(out_mine, out_reference, rtol=0, atol=0)
    out_mine.square().sum().backward()
    out_reference.square().sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


@pytest.mark.slow  # a subprocess that exports the backbone to ONNX: about 10 s
def test_explaining_and_indexing_never_import_torchvision(tmp_path: Path) -> None:
    """With torchvision made unimportable, ``diml explain`` and ``diml index build`` still run
    (the serving image has no torchvision: no wheel exists beside a CPU-only PyTorch)."""
    script = (
        "import sys\n"
        "sys.modules['torchvision'] = None  # any import of it raises ImportError\n"
        "from service.cli import main\n"
        "for argv in sys.argv[1:]:\n"
        "    code = main(argv.split('|'))\n"
        "    assert not code, (argv, code)\n"
    )
    gallery = REPO / "gallery" / "cat"
    env = {**os.environ, "DIML_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            f"explain|{gallery / 'cat-photo.jpg'}|{gallery / 'cat-mirror.jpg'}|--json",
            f"index|build|--images|{gallery}|--out|{tmp_path / 'cats.index'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"score"' in done.stdout
    assert (tmp_path / "cats.index").is_dir()
