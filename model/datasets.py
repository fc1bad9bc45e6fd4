"""Metric-learning data sets, each read from its publisher's own layout.

- ``cub``: CUB-200-2011 (``images.txt``, ``image_class_labels.txt``, ``bounding_boxes.txt``,
  ``parts/part_locs.txt``, ``images/``); the only one with part keypoints.
- ``cars``: Cars196, either ``cars_annos.mat`` beside ``car_ims/`` or the devkit's
  ``devkit/cars_train_annos.mat`` + ``cars_test_annos_withlabels.mat`` beside ``cars_train/`` and
  ``cars_test/`` (reading ``.mat`` files needs SciPy, which the ``train`` extra installs).
- ``sop``: Stanford Online Products (``Ebay_train.txt`` and ``Ebay_test.txt``).
- ``folder``: one sub-folder per class (classes numbered 1.. in sorted folder order).

Metric learning trains and tests on disjoint classes, so every set is selected by a class range
(``"1-20"``, ``"21-30"``, ``"1-5,9"``) over the publisher's 1-based class ids, not by its
train/test flag.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CUB_PARTS = 15


class DatasetError(ValueError):
    """A data-set file is missing or malformed; the message names it and the expected format."""

    def __init__(self, path: Path, problem: str, expected: str) -> None:
        super().__init__(f"{path}: {problem} (expected {expected})")
        self.path = path


@dataclass(frozen=True)
class Record:
    """One image: its file, its 1-based class id, and CUB's annotations where present.

    box: ``(x, y, width, height)`` in original pixels; keypoints: (P, 3) of ``x, y, visible``.
    """

    path: Path
    label: int
    box: tuple[float, float, float, float] | None = None
    keypoints: torch.Tensor | None = None


@dataclass(frozen=True)
class ImageSet:
    """The records of one data set (or a class range of it), with its class names by id."""

    name: str
    root: Path
    records: list[Record]
    class_names: dict[int, str]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([r.label for r in self.records], dtype=torch.long)

    @property
    def classes(self) -> list[int]:
        return sorted({r.label for r in self.records})

    @property
    def has_keypoints(self) -> bool:
        return bool(self.records) and all(
            r.keypoints is not None and r.box is not None for r in self.records
        )

    def select(self, classes: str | Iterable[int] | None) -> ImageSet:
        """The records whose class is in ``classes`` (a range string such as ``"1-20"``)."""
        if classes is None:
            return self
        wanted = parse_classes(classes) if isinstance(classes, str) else set(classes)
        records = [r for r in self.records if r.label in wanted]
        if not records:
            raise ValueError(
                f"no image of {self.name} at {self.root} is in classes {describe(wanted)}; "
                f"its classes are {describe(set(self.class_names))}"
            )
        names = {c: n for c, n in self.class_names.items() if c in wanted}
        return ImageSet(self.name, self.root, records, names)


def parse_classes(text: str) -> set[int]:
    """``"1-20"``, ``"21-30"``, ``"1-5,9,12-14"`` -> the set of 1-based class ids."""
    wanted: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"bad class range {text!r}: write it like 1-20 or 1-5,9,12-14")
        first = int(match.group(1))
        last = int(match.group(2) or first)
        if first < 1 or last < first:
            raise ValueError(f"bad class range {text!r}: ranges go from 1 upwards, low-high")
        wanted.update(range(first, last + 1))
    return wanted


def describe(classes: set[int]) -> str:
    """A short text for a set of class ids: ``1-20,25``."""
    runs: list[str] = []
    for c in sorted(classes):
        if runs and runs[-1].split("-")[-1] == str(c - 1):
            runs[-1] = f"{runs[-1].split('-')[0]}-{c}"
        else:
            runs.append(str(c))
    return ",".join(runs) or "none"


def _table(path: Path, expected: str, *types: type) -> list[tuple]:
    """The rows of a text file, field i converted by ``types[i]``; a last ``str`` field takes
    the rest of the line (paths and names may hold spaces). Errors name the file and line."""
    if not path.is_file():
        raise DatasetError(path, "missing", expected)
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split(maxsplit=len(types) - 1)
            if not fields:
                continue
            if len(fields) < len(types):
                raise DatasetError(path, f"line {number} has {len(fields)} fields", expected)
            try:
                rows.append(tuple(kind(field) for kind, field in zip(types, fields, strict=False)))
            except ValueError:
                raise DatasetError(path, f"line {number} is {line.strip()!r}", expected) from None
    return rows


def read_cub(root: Path) -> ImageSet:
    """CUB-200-2011 in the release's layout (``root`` holds ``images.txt``)."""
    root = Path(root)
    labels_txt = root / "image_class_labels.txt"
    boxes_txt = root / "bounding_boxes.txt"
    parts_txt = root / "parts" / "part_locs.txt"
    classes_txt = root / "classes.txt"
    paths = {
        i: root / "images" / rel.strip()
        for i, rel in _table(root / "images.txt", "lines '<image_id> <relative path>'", int, str)
    }
    labels = dict(_table(labels_txt, "lines '<image_id> <class_id>'", int, int))
    boxes = {
        i: (x, y, w, h)
        for i, x, y, w, h in _table(
            boxes_txt, "lines '<image_id> <x> <y> <width> <height>'", int, *[float] * 4
        )
    }
    keypoints = _cub_keypoints(parts_txt, set(paths))
    names: dict[int, str] = {}
    if classes_txt.is_file():
        names = {c: n.strip() for c, n in _table(classes_txt, "'<class_id> <name>'", int, str)}
    records = []
    for image_id, path in sorted(paths.items()):
        for table, file in ((labels, labels_txt), (boxes, boxes_txt)):
            if image_id not in table:
                raise DatasetError(file, f"no line for image {image_id}", "one line per image")
        label = labels[image_id]
        names.setdefault(label, str(label))
        records.append(Record(path, label, boxes[image_id], keypoints[image_id]))
    return ImageSet("cub", root, records, names)


def _cub_keypoints(path: Path, image_ids: set[int]) -> dict[int, torch.Tensor]:
    expected = "lines '<image_id> <part_id 1-15> <x> <y> <visible 0/1>'"
    rows = _table(path, expected, int, int, float, float, float)
    table = torch.zeros(max(image_ids, default=0) + 1, CUB_PARTS, 3)
    for number, (image_id, part, x, y, visible) in enumerate(rows, 1):
        if image_id not in image_ids or not 1 <= part <= CUB_PARTS:
            raise DatasetError(
                path, f"row {number}: unknown image {image_id} or part {part}", expected
            )
        table[image_id, part - 1] = torch.tensor([x, y, visible])
    return {i: table[i] for i in image_ids}


def read_cars(root: Path) -> ImageSet:
    """Cars196 from ``cars_annos.mat`` + ``car_ims/`` or from the devkit's annotation files."""
    root = Path(root)
    combined = root / "cars_annos.mat"
    expected = (
        "cars_annos.mat with an 'annotations' struct (relative_im_path, bbox_x1, bbox_y1, "
        "bbox_x2, bbox_y2, class), or devkit/cars_train_annos.mat and "
        "cars_test_annos_withlabels.mat"
    )
    if combined.is_file():
        sources = [(combined, root)]
    else:
        devkit = root / "devkit"
        train = devkit / "cars_train_annos.mat"
        test = root / "cars_test_annos_withlabels.mat"
        if not test.is_file():
            test = devkit / "cars_test_annos_withlabels.mat"
        if not train.is_file():
            raise DatasetError(combined, "missing", expected)
        sources = [(train, root / "cars_train")]
        if test.is_file():
            sources.append((test, root / "cars_test"))
    records: list[Record] = []
    for mat, image_dir in sources:
        records.extend(_cars_records(mat, image_dir, expected))
    names = {c: str(c) for c in sorted({r.label for r in records})}
    return ImageSet("cars", root, records, names)


def _cars_records(mat: Path, image_dir: Path, expected: str) -> list[Record]:
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - scipy comes with the train extra
        raise DatasetError(mat, "reading .mat files needs SciPy", "pip install scipy") from e
    try:
        annotations = loadmat(str(mat), squeeze_me=True)["annotations"]
    except Exception as e:
        raise DatasetError(mat, f"cannot read it ({e})", expected) from e
    fields = annotations.dtype.names or ()
    path_field = "relative_im_path" if "relative_im_path" in fields else "fname"
    needed = {path_field, "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class"}
    if not needed <= set(fields):
        raise DatasetError(mat, f"its annotations have fields {sorted(fields)}", expected)
    records = []
    for row in annotations.ravel():
        x1, y1 = float(row["bbox_x1"]), float(row["bbox_y1"])
        x2, y2 = float(row["bbox_x2"]), float(row["bbox_y2"])
        box = (x1, y1, x2 - x1, y2 - y1)
        records.append(Record(image_dir / str(row[path_field]), int(row["class"]), box))
    return records


def read_sop(root: Path) -> ImageSet:
    """Stanford Online Products: ``Ebay_train.txt`` and ``Ebay_test.txt`` (both, by class)."""
    root = Path(root)
    expected = "a header line, then '<image_id> <class_id> <super_class_id> <path>' lines"
    files = [root / n for n in ("Ebay_train.txt", "Ebay_test.txt") if (root / n).is_file()]
    if not files:
        raise DatasetError(root / "Ebay_train.txt", "missing", expected)
    records: list[Record] = []
    for path in files:
        header, *rows = _table(path, expected, str, str, str, str)
        if header[1] != "class_id":
            raise DatasetError(path, "its first line is not the header", expected)
        for number, (_, label, _, rel) in enumerate(rows, 2):
            if not label.isdigit():
                raise DatasetError(path, f"line {number}: {label!r} is not a class id", expected)
            records.append(Record(root / rel.strip(), int(label)))
    names = {c: str(c) for c in sorted({r.label for r in records})}
    return ImageSet("sop", root, records, names)


def read_folder(root: Path) -> ImageSet:
    """One sub-folder per class; classes are numbered 1.. in sorted folder-name order."""
    root = Path(root)
    expected = "one sub-folder of images per class"
    if not root.is_dir():
        raise DatasetError(root, "not a folder", expected)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    records: list[Record] = []
    names: dict[int, str] = {}
    for label, folder in enumerate(folders, 1):
        names[label] = folder.name
        images = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        records.extend(Record(p, label) for p in images)
    if not records:
        raise DatasetError(root, "no images in sub-folders", expected)
    return ImageSet("folder", root, records, names)


READERS: dict[str, Callable[[Path], ImageSet]] = {
    "cub": read_cub,
    "cars": read_cars,
    "sop": read_sop,
    "folder": read_folder,
}


def read_dataset(root: Path, kind: str | None = None, classes: str | None = None) -> ImageSet:
    """Read the data set at ``root`` (``kind`` guessed from its files when None), by class."""
    root = Path(root)
    kind = kind or guess_kind(root)
    if kind not in READERS:
        raise ValueError(f"unknown data set kind {kind!r}; known: {', '.join(READERS)}")
    return READERS[kind](root).select(classes)


def guess_kind(root: Path) -> str:
    if (root / "images.txt").is_file():
        return "cub"
    if (root / "cars_annos.mat").is_file() or (root / "devkit").is_dir():
        return "cars"
    if (root / "Ebay_train.txt").is_file() or (root / "Ebay_test.txt").is_file():
        return "sop"
    return "folder"
