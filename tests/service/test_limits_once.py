"""One limit per thing, declared once: whatever a write path accepts, the read paths take.

Walks each limit from where it is written (the service's add, an index build's list, the CLI)
to where it is read back (the search filters, the service's decoding of stored images)."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from index_builder import Source, SourceListError, add_images, build_index, read_list
from index_builder.cli import add_index
from index_builder.embedding import decode_source, embed_sources
from index_builder.limits import DEFAULT_MAX_BYTES, MAX_KEY_LENGTH, MAX_LABEL_LENGTH
from index_builder.ray_build import _embedded_dataset
from model.image_limits import DEFAULT_MAX_ASPECT, DEFAULT_MAX_PIXELS
from model.preprocessing import load_for_model
from service.app import create_app
from service.settings import Settings
from tests.service.conftest import png, settings_for


def _writable(served: dict[str, Path], index: Path) -> TestClient:
    return TestClient(create_app(settings_for(served, index), load_in_background=False))


def _add(
    client: TestClient, key: str | None = None, label: str | None = None, n: int = 1
) -> httpx.Response:
    files = [("images", (f"new{i}.png", png(Image.new("RGB", (70, 50), (9, 9 * i, 90)))))
             for i in range(n)]  # fmt: skip
    data = {name: value for name, value in (("key", key), ("label", label)) if value is not None}
    return client.post("/gallery", files=files, data=data)


def test_a_label_of_the_longest_length_is_stored_and_found_by_the_filters(
    served: dict[str, Path], fresh_index: Path
) -> None:
    """The finding: labels of up to 512 characters were stored, the filters took 200."""
    label = "é" + "l" * (MAX_LABEL_LENGTH - 1)
    with _writable(served, fresh_index) as client:
        added = _add(client, label=label)
        assert added.status_code == 201, added.text
        (item,) = added.json()["added"]
        assert item["label"] == label
        found = client.post("/search/by-id/0", params={"label": label, "k": 5})
        assert found.status_code == 200, found.text
        assert [hit["id"] for hit in found.json()["results"]] == [item["id"]]
        others = client.post("/search/by-id/0", params={"exclude_label": label, "k": 100})
        assert others.status_code == 200, others.text
        assert item["id"] not in [hit["id"] for hit in others.json()["results"]]
        labels = {entry["label"] for entry in client.get("/gallery/labels").json()}
        assert label in labels
        longer = _add(client, label=label + "x")
        assert longer.status_code == 422
        assert "label" in longer.json()["error"]["message"]
        for name in ("label", "exclude_label"):
            refused = client.post("/search/by-id/0", params={name: label + "x"})
            assert refused.status_code == 422
            assert name in refused.json()["error"]["message"]


def test_a_key_of_the_longest_length_is_stored_and_one_longer_is_refused(
    served: dict[str, Path], fresh_index: Path
) -> None:
    key = "k" * MAX_KEY_LENGTH
    with _writable(served, fresh_index) as client:
        added = _add(client, key=key)
        assert added.status_code == 201, added.text
        item_id = added.json()["added"][0]["id"]
        assert client.get(f"/gallery/{item_id}").json()["key"] == key
        longer = _add(client, key=key + "k")
        assert longer.status_code == 422
        assert "key" in longer.json()["error"]["message"]
        # Several images under one key are KEY-0, KEY-1, ...: those must fit too.
        several = _add(client, key=key, n=2)
        assert several.status_code == 422, several.text
        message = several.json()["error"]["message"]
        assert message.startswith("key:")
        assert f"at most {MAX_KEY_LENGTH - 2}" in message
        assert _add(client, key=key[:-2], n=2).status_code == 201
        long_name = [("images", ("n" * (MAX_KEY_LENGTH + 1) + ".png", png()))]
        refused = client.post("/gallery", files=long_name)
        assert refused.status_code == 422
        assert refused.json()["error"]["message"].startswith("images:")


def test_index_builds_and_adds_hold_keys_and_labels_to_the_same_limits(tmp_path: Path) -> None:
    Source(tmp_path / "a.png", "k" * MAX_KEY_LENGTH, "l" * MAX_LABEL_LENGTH)
    with pytest.raises(ValueError, match="label"):
        Source(tmp_path / "a.png", "a.png", "l" * (MAX_LABEL_LENGTH + 1))
    with pytest.raises(ValueError, match="key"):
        Source(tmp_path / "a.png", "k" * (MAX_KEY_LENGTH + 1))
    listed = tmp_path / "list.csv"
    listed.write_text(f"path,label\na.png,{'l' * MAX_LABEL_LENGTH}\nb.png,{'l' * 256}\n")
    with pytest.raises(SourceListError, match=r"list.csv:3: .*label"):
        read_list(listed)


def test_the_file_size_limit_has_one_default() -> None:
    """Every build and add (in this process or on Ray) and the CLI skip files over the same
    size (the Ray build once wrote its own 50 MB)."""
    for function in (build_index, add_images, embed_sources, decode_source, _embedded_dataset):
        assert inspect.signature(function).parameters["max_bytes"].default == DEFAULT_MAX_BYTES
    parser = argparse.ArgumentParser()
    add_index(parser.add_subparsers())
    args = parser.parse_args(["index", "build", "--images", "g", "--out", "i"])
    assert args.max_bytes == DEFAULT_MAX_BYTES


def test_image_limits_have_one_default() -> None:
    """The index builder's decoding and the service's defaults are the same numbers, so that
    every image a build indexed is one the service takes (and decodes again to explain)."""
    defaults = inspect.signature(load_for_model).parameters
    assert defaults["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert defaults["max_aspect"].default == DEFAULT_MAX_ASPECT
    assert Settings.model_fields["max_pixels"].default == DEFAULT_MAX_PIXELS
    assert Settings.model_fields["max_aspect_ratio"].default == DEFAULT_MAX_ASPECT
