"""kill -9 at every step of a build and of an add: the index is always the old or the new one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from index_builder import GalleryIndex
from index_builder.files import CRASH_ENV
from tests.index_builder.helpers import build_tiny, make_images, tiny_embedder

pytestmark = pytest.mark.slow  # builds killed at each commit point: the full lane

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "tests.index_builder.helpers", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _killed(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == -signal.SIGKILL


@pytest.fixture
def old_index(tmp_path: Path) -> tuple[Path, Path]:
    tiny_embedder()  # skips when the weights are absent
    gallery = tmp_path / "gallery"
    make_images(gallery, 6)
    out = tmp_path / "index"
    build_tiny(gallery, out)
    make_images(gallery, 6, seed=1)  # the next build has 12 images
    return gallery, out


@pytest.mark.parametrize(
    "point",
    ["build:segment-written", "build:segment-committed", "build:renamed", "build:published"],
)
def test_kill_during_build_keeps_a_good_index_and_the_rerun_resumes(
    old_index: tuple[Path, Path], point: str
) -> None:
    gallery, out = old_index
    crashed = _run("build", str(gallery), str(out), "4", crash_at=point)
    assert _killed(crashed), crashed.stderr
    after_crash = GalleryIndex.open(out)
    assert after_crash.verify() == []
    assert after_crash.count == (12 if point == "build:published" else 6)
    after_crash.close()
    rerun = _run("build", str(gallery), str(out), "4")
    assert rerun.returncode == 0, rerun.stderr
    final = GalleryIndex.open(out)
    assert final.count == 12
    assert final.verify() == []
    assert len(list(out.glob("v-*"))) == 1


def test_an_interrupted_build_resumes_where_it_stopped(old_index: tuple[Path, Path]) -> None:
    gallery, out = old_index
    crashed = _run("build", str(gallery), str(out), "4", crash_at="build:segment-committed")
    assert _killed(crashed)
    # The first segment (4 items) was committed before the kill: the resumed build keeps it.
    from index_builder.table import ItemTable

    table = ItemTable(out / ".building", readonly=True)
    assert table.count() == 4
    table.close()
    report = build_tiny(gallery, out, segment_size=4)
    assert report.indexed == 8  # only what the interrupted build had not committed
    assert report.count == 12


@pytest.mark.parametrize(("point", "count"), [("add:segment-written", 6), ("add:committed", 8)])
def test_kill_during_add_is_all_or_nothing(
    old_index: tuple[Path, Path], tmp_path: Path, point: str, count: int
) -> None:
    _, out = old_index
    new = make_images(tmp_path / "new", 2, seed=4)
    crashed = _run("add", str(out), *map(str, new), crash_at=point)
    assert _killed(crashed), crashed.stderr
    index = GalleryIndex.open(out)
    assert index.count == count
    index.close()
    # The next writer cleans up (orphan segment files, manifest count) and verify passes.
    from index_builder import writing

    with writing(out) as index:
        pass
    index = GalleryIndex.open(out)
    assert index.verify() == []
    assert index.manifest.count == count
    assert len(list((index.folder / "segments").glob("*.npy"))) == 2 * len(index.table.segments())
