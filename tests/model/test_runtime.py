"""The backbone through ONNX Runtime: the same embeddings as PyTorch, cached, checked on load,
and PyTorch whenever ONNX Runtime cannot be trusted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from model import Embedder, load_image, load_model
from model import runtime as runtime_module
from model.runtime import OnnxBackbone, RuntimeUnavailableError, choose

pytest.importorskip("onnxruntime", reason="pip install onnxruntime onnx")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model()


def test_onnx_embeddings_equal_pytorch_ones(model: torch.nn.Module, tmp_path: Path) -> None:
    onnx = Embedder(model, runtime="onnx")
    assert onnx.runtime == "onnx"
    plain = Embedder(model, runtime="torch")
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    a, b = onnx.embed_pixels(pixels), plain.embed_pixels(pixels)
    assert torch.allclose(a.parts, b.parts, atol=1e-4)
    assert torch.allclose(a.vector, b.vector, atol=1e-5)


def test_auto_is_onnx_on_the_cpu_and_torch_on_cuda() -> None:
    assert choose("auto", torch.device("cpu")) == "onnx"
    assert choose("auto", torch.device("cuda")) == "torch"
    assert choose("torch", torch.device("cpu")) == "torch"


def test_the_exported_graph_is_cached_by_model(
    model: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIML_CACHE", str(tmp_path))
    Embedder(model, runtime="onnx")
    graphs = list((tmp_path / "onnx").glob("backbone-*.onnx"))
    assert len(graphs) == 1
    exported = graphs[0].read_bytes()
    graphs[0].write_bytes(b"not a graph")  # a damaged cache entry is exported anew
    again = Embedder(model, runtime="onnx")
    assert again.runtime == "onnx"
    assert graphs[0].read_bytes() == exported


def test_features_that_differ_from_pytorch_fall_back_to_pytorch(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime_module, "TOLERANCE", -1.0)  # nothing can pass
    embedder = Embedder(model, runtime="onnx")
    assert embedder.runtime == "torch"
    assert embedder.onnx is None
    assert "differ from PyTorch's" in caplog.text


def test_without_onnxruntime_auto_means_pytorch(
    model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    assert choose("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeUnavailableError, match="not installed"):
        OnnxBackbone(model.backbone, "key", 224)
    assert Embedder(model, runtime="onnx").runtime == "torch"


def test_an_index_built_with_onnx_takes_adds_and_searches_embedded_by_pytorch(
    tmp_path: Path,
) -> None:
    from index_builder import GalleryIndex, Source, add_images, build_index, scan_folder
    from tests.index_builder.helpers import make_images, tiny_embedder

    onnx = tiny_embedder()
    assert onnx.runtime == "onnx"
    plain = Embedder(onnx.model, runtime="torch")
    make_images(tmp_path / "gallery", 6)
    build_index(scan_folder(tmp_path / "gallery"), tmp_path / "index", onnx, workers=0)
    new = make_images(tmp_path / "new", 1, seed=9)[0]
    index = GalleryIndex.open(tmp_path / "index", writable=True)
    try:  # the fingerprint does not depend on the runtime: PyTorch's embeddings are accepted
        report = add_images(index, [Source(new, "new")], plain)
        embedding, _ = plain.embed([load_image(new)])
        _, ids = index.search(embedding.vector.numpy(), 1)
    finally:
        index.close()
    assert ids[0, 0] == report.ids[0]
