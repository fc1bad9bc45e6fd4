"""Data-set readers: the publishers' layouts, class ranges, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.datasets import (
    DatasetError,
    describe,
    guess_kind,
    parse_classes,
    read_cars,
    read_cub,
    read_dataset,
    read_folder,
    read_sop,
)


def test_class_ranges() -> None:
    assert parse_classes("1-3") == {1, 2, 3}
    assert parse_classes("1-2, 5,7-8") == {1, 2, 5, 7, 8}
    assert describe({1, 2, 3, 5, 7, 8}) == "1-3,5,7-8"
    for bad in ("", "a-b", "3-1", "0-4", "1-"):
        with pytest.raises(ValueError, match="class range"):
            parse_classes(bad)


def make_cub(root: Path, images: int = 4) -> Path:
    (root / "parts").mkdir(parents=True)
    lines = [f"{i} 00{1 + (i - 1) // 2}.Bird/b{i}.jpg" for i in range(1, images + 1)]
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    labels = [f"{i} {1 + (i - 1) // 2}" for i in range(1, images + 1)]
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    boxes = [f"{i} 1.0 2.0 30.0 40.0" for i in range(1, images + 1)]
    (root / "bounding_boxes.txt").write_text("\n".join(boxes) + "\n")
    parts = [f"{i} {p} {p}.5 {i}.0 {p % 2}" for i in range(1, images + 1) for p in range(1, 16)]
    (root / "parts" / "part_locs.txt").write_text("\n".join(parts) + "\n")
    (root / "classes.txt").write_text("1 001.Bird one\n2 002.Other\n")
    return root


def test_cub_layout(tmp_path: Path) -> None:
    images = read_cub(make_cub(tmp_path))
    assert len(images) == 4
    assert images.classes == [1, 2]
    assert images.class_names == {1: "001.Bird one", 2: "002.Other"}
    first = images.records[0]
    assert first.path == tmp_path / "images" / "001.Bird/b1.jpg"
    assert first.box == (1.0, 2.0, 30.0, 40.0)
    assert first.keypoints is not None
    assert first.keypoints.shape == (15, 3)
    assert first.keypoints[2].tolist() == [3.5, 1.0, 1.0]
    assert images.has_keypoints
    assert [r.label for r in images.select("2").records] == [2, 2]
    assert guess_kind(tmp_path) == "cub"


@pytest.mark.parametrize(
    ("file", "content", "problem"),
    [
        ("image_class_labels.txt", "1 1\n2 x\n", "line 2 is '2 x'"),
        ("bounding_boxes.txt", "1 1 2 3\n", "line 1 has 4 fields"),
        ("parts/part_locs.txt", "1 16 1 1 1\n", "unknown image 1 or part 16"),
        ("image_class_labels.txt", "1 1\n", "no line for image 2"),
    ],
)
def test_cub_malformed_files_are_named(
    tmp_path: Path, file: str, content: str, problem: str
) -> None:
    make_cub(tmp_path)
    (tmp_path / file).write_text(content)
    with pytest.raises(DatasetError) as caught:
        read_cub(tmp_path)
    assert str(tmp_path / file) in str(caught.value)
    assert problem in str(caught.value)
    assert "expected" in str(caught.value)


def test_cub_missing_file(tmp_path: Path) -> None:
    make_cub(tmp_path)
    (tmp_path / "bounding_boxes.txt").unlink()
    with pytest.raises(DatasetError, match=r"bounding_boxes.txt: missing \(expected lines"):
        read_cub(tmp_path)


def test_sop_layout_and_errors(tmp_path: Path) -> None:
    header = "image_id class_id super_class_id path\n"
    (tmp_path / "Ebay_train.txt").write_text(header + "1 1 1 bicycle_final/a.JPG\n2 1 1 b c.JPG\n")
    (tmp_path / "Ebay_test.txt").write_text(header + "3 11319 2 cabinet_final/c.JPG\n")
    images = read_sop(tmp_path)
    assert [r.label for r in images.records] == [1, 1, 11319]
    assert images.records[1].path == tmp_path / "b c.JPG"
    assert len(read_dataset(tmp_path, None, "11319-22634")) == 1
    (tmp_path / "Ebay_test.txt").write_text(header + "3 x 2 cabinet_final/c.JPG\n")
    with pytest.raises(DatasetError, match=r"Ebay_test.txt: line 2: 'x' is not a class id"):
        read_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").write_text("3 1 2 cabinet_final/c.JPG\n")
    with pytest.raises(DatasetError, match="not the header"):
        read_sop(tmp_path)


def test_cars_annotations(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io", reason="SciPy comes with the train extra")
    dtype = [
        ("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
        ("bbox_y2", "O"), ("class", "O"), ("test", "O"),
    ]  # fmt: skip
    rows = np.array(
        [("car_ims/000001.jpg", 10, 20, 110, 70, 1, 0), ("car_ims/000002.jpg", 0, 0, 5, 5, 2, 1)],
        dtype=dtype,
    )
    scipy_io.savemat(tmp_path / "cars_annos.mat", {"annotations": rows})
    images = read_cars(tmp_path)
    assert [r.label for r in images.records] == [1, 2]
    assert images.records[0].path == tmp_path / "car_ims/000001.jpg"
    assert images.records[0].box == (10.0, 20.0, 100.0, 50.0)
    assert guess_kind(tmp_path) == "cars"
    no_paths = np.array([(1, 0), (2, 1)], dtype=[("class", "O"), ("test", "O")])
    scipy_io.savemat(tmp_path / "cars_annos.mat", {"annotations": no_paths})
    with pytest.raises(DatasetError, match="relative_im_path"):
        read_cars(tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match="cannot read it"):
        read_cars(tmp_path)


def test_folder_layout(tmp_path: Path) -> None:
    for name in ("b_dogs", "a_cats"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"")
        (tmp_path / name / "notes.txt").write_text("not an image")
    images = read_folder(tmp_path)
    assert images.class_names == {1: "a_cats", 2: "b_dogs"}
    assert [r.path.parent.name for r in images.records] == ["a_cats", "b_dogs"]
    with pytest.raises(ValueError, match="no image of folder"):
        images.select("3-4")
    with pytest.raises(DatasetError, match="no images in sub-folders"):
        read_folder(tmp_path / "a_cats")


def test_real_cub_dev(cub_dev: Path) -> None:
    images = read_dataset(cub_dev)
    assert images.name == "cub"
    assert len(images) == 1701
    assert len(images.classes) == 30
    assert images.has_keypoints
    test = images.select("21-30")
    assert set(test.classes) == set(range(21, 31))
    assert all(r.path.is_file() for r in test.records[:20])


def test_cars_devkit_layout(tmp_path: Path) -> None:
    scipy_io = pytest.importorskip("scipy.io", reason="SciPy comes with the train extra")
    fields = [
        ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"),
        ("fname", "O"),
    ]  # fmt: skip
    (tmp_path / "devkit").mkdir()
    train = np.array([(1, 2, 11, 22, 5, "00001.jpg")], dtype=fields)
    test = np.array([(0, 0, 9, 9, 7, "00001.jpg"), (0, 0, 9, 9, 5, "00002.jpg")], dtype=fields)
    scipy_io.savemat(tmp_path / "devkit" / "cars_train_annos.mat", {"annotations": train})
    scipy_io.savemat(tmp_path / "cars_test_annos_withlabels.mat", {"annotations": test})
    images = read_dataset(tmp_path)
    assert images.name == "cars"
    assert [(r.path.relative_to(tmp_path).as_posix(), r.label) for r in images.records] == [
        ("cars_train/00001.jpg", 5),
        ("cars_test/00001.jpg", 7),
        ("cars_test/00002.jpg", 5),
    ]
    assert images.records[0].box == (1.0, 2.0, 10.0, 20.0)
