"""The documentation's commands run as pasted, and its links lead somewhere.

The README's shell commands are read from its ```bash blocks and run from a folder that stands
for the root of a fresh clone (the repository's `.venv` and `gallery/` linked in): the `diml`
commands as they are, the `curl` commands against a real `diml serve` on the index that the
tour builds (what `bash docker/entrypoint.sh` serves: the embedded gallery, default model).
The commands that install, start the long-running service, run the whole test suite or need
Docker are not run here, each for the reason that ``skipped`` gives. The `curl` examples of
docs/http-api.md run against the same server (its `/search` answer is the one shown), and the
indexing examples of docs/cli.md run as they are. Every page's commands are checked for what
fails when pasted: placeholders, `sudo`, a bare `python`, a `curl` that fails silently."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO
from tests.live_server import Server

README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
SERVICE_URL = "http://127.0.0.1:8000"  # where the README's "Run it" serves


# -- reading the pages ---------------------------------------------------------------------------


def section(page: Path, title: str) -> str:
    """The text of the page's section ``## title``, up to the next section."""
    text = page.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def shell_commands(page: Path | str) -> list[str]:
    """The commands of the ```bash blocks of a page (or of a part of one): continued lines
    joined, comment lines left out."""
    text = page.read_text() if isinstance(page, Path) else page
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in re.sub(r"\\\n\s*", "", block).splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(command.strip())
    return commands


def shown_commands(page: Path) -> list[tuple[str, str]]:
    """Each `$ command` line of the page's ```text blocks, with what the page shows it print."""
    shown = []
    for block in re.findall(r"```text\n(.*?)```", page.read_text(), re.S):
        for part in re.split(r"^\$ ", block, flags=re.M)[1:]:
            command, _, printed = part.partition("\n")
            shown.append((command.split("   #")[0], printed))
    return shown


def headings(page: Path) -> set[str]:
    """The page's anchors as GitHub makes them from its headings."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    anchors: set[str] = set()
    for title in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = 0
        while (anchor := slug if n == 0 else f"{slug}-{n}") in anchors:
            n += 1
        anchors.add(anchor)
    return anchors


# -- running commands ----------------------------------------------------------------------------


def skipped(command: str) -> str | None:
    """Why a README command is not run by these tests, or None when it is."""
    if command.startswith("bash scripts/setup.sh"):
        return "installs .venv, then serves until stopped or runs every test (this suite)"
    if command.startswith("docker "):
        return "needs a Docker engine"
    if "cub-dev" in command or "DIML_CUB_DEV" in command:
        return "needs the CUB photos"
    return None


def runnable(command: str) -> bool:
    return command.startswith((".venv/bin/diml ", "curl "))


def fresh_clone(folder: Path) -> Path:
    """``folder`` made to stand for the root of a clone after `bash scripts/setup.sh`."""
    if not (REPO / ".venv" / "bin" / "diml").exists():
        pytest.skip("the documented commands use .venv (bash scripts/setup.sh makes it)")
    for name in (".venv", "gallery", "README.md"):
        (folder / name).symlink_to(REPO / name)
    return folder


def run(command: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=folder, capture_output=True, text=True, timeout=300
    )


def run_ok(command: str, folder: Path) -> str:
    """What the command prints; AssertionError with its output when it fails."""
    done = run(command, folder)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


# -- every page ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_the_commands_can_be_pasted(page: Path) -> None:
    """No placeholders, no sudo, the project's Python, and curl that says when it failed."""
    commands = shell_commands(page) + [command for command, _ in shown_commands(page)]
    for command in commands:
        assert not re.search(r"\bsudo\b", command), f"{command}: root is not always sudo"
        assert not re.match(r"python3? ", command), f"{command}: use .venv/bin/python"
        placeholder = re.search(r"\[--|\s\.\.\.(\s|$)|<[A-Za-z_]+>", command)
        assert not placeholder, f"{command}: a placeholder fails when pasted"
        if command.startswith("curl "):
            assert "--fail-with-body" in command, f"{command}: curl -s fails silently"


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_leads_somewhere(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in headings(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


# -- the README ----------------------------------------------------------------------------------


def test_every_readme_command_is_run_here_or_skipped_for_a_reason() -> None:
    commands = shell_commands(README)
    unknown = [c for c in commands if skipped(c) is None and not runnable(c)]
    assert not unknown, f"README commands this file does not know how to run: {unknown}"
    assert sum(runnable(c) for c in commands) >= 6, "the README's tour is gone"
    curls = [c for c in commands if c.startswith("curl ")]
    assert all(SERVICE_URL in c for c in curls), "the tour talks to the service of Run it"


def test_the_readme_starts_with_the_service_and_the_tests_that_ci_runs() -> None:
    first, second = [c.split("#")[0].strip() for c in shell_commands(README)[:2]]
    assert first == "bash scripts/setup.sh && bash docker/entrypoint.sh"
    setup, tests = second.split(" && ")
    assert setup == "bash scripts/setup.sh"
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


@dataclass
class Clone:
    """A folder that stands for the root of a clone, after the README's CLI tour ran in it."""

    root: Path
    printed: str


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Clone:
    root = fresh_clone(tmp_path_factory.mktemp("clone"))
    tour = [c for c in shell_commands(README) if c.startswith(".venv/bin/diml ")]
    printed = [run_ok(command, root) for command in tour if skipped(command) is None]
    return Clone(root, "\n".join(printed))


@pytest.fixture(scope="module")
def server(clone: Clone) -> Iterator[Server]:
    """`diml serve` on the index that the tour built: the embedded gallery, as Run it serves it."""
    running = Server(clone.root / "my.index", DIML_ANONYMOUS_WRITES="off")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.mark.slow
def test_the_readme_cli_tour_does_what_it_says(clone: Clone) -> None:
    assert "verdict: close" in clone.printed  # the cat's photo against its mirror image
    assert "20 groups of near-copies" in clone.printed  # the 20 scenes
    assert (clone.root / "pair.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_the_readme_curl_tour_runs_against_the_service(clone: Clone, server: Server) -> None:
    curls = [c for c in shell_commands(README) if c.startswith("curl ")]
    assert curls
    (clone.root / "pair.png").unlink(missing_ok=True)  # the CLI tour made one too
    for command in curls:
        printed = run_ok(command.replace(SERVICE_URL, server.url), clone.root)
        if "/search" in command:  # "finds the other three views of the cat first"
            keys = [hit["key"] for hit in json.loads(printed)["results"]]
            assert all(key.startswith("cat/") for key in keys[:4]), keys
    assert (clone.root / "pair.png").read_bytes().startswith(b"\x89PNG")


# -- the other pages -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_http_examples_are_what_the_service_answers(clone: Clone, server: Server) -> None:
    examples = [(c, p) for c, p in shown_commands(REPO / "docs" / "http-api.md") if "curl " in c]
    assert len(examples) >= 5, "the HTTP examples of docs/http-api.md are gone"
    answers = {}
    for command, shown in examples:
        done = run(command.replace(SERVICE_URL, server.url), clone.root)
        refused = shown.startswith('{"error"')  # --fail-with-body: exit 22, the body printed
        assert done.returncode == (22 if refused else 0), f"{command}\n{done.stderr}"
        if refused:
            assert json.loads(done.stdout) == json.loads(shown)
        answers[command] = done.stdout
    # The first /search example in full: its hits, scores and the flow's strongest matches.
    command, shown = next((c, p) for c, p in examples if "/search?k=5&matches=3" in c)
    results = json.loads(answers[command])["results"]
    hits = re.findall(
        r'"id": (\d+), "key": "([^"]+)",(?: "label": "[^"]+",)? "score": ([\d.]+)', shown
    )
    pairs = re.findall(r'"query_region": (\d+), "result_region": (\d+)', shown)
    assert (len(hits), len(pairs)) == (5, 3), "the /search example changed its form"
    assert [(r["id"], r["key"]) for r in results] == [(int(i), key) for i, key, _ in hits]
    scores = [float(score) for *_, score in hits]
    np.testing.assert_allclose([r["score"] for r in results], scores, atol=2e-3)
    matches = results[1]["explanation"]["matches"]
    assert [(m["query_region"], m["result_region"]) for m in matches] == [
        (int(a), int(b)) for a, b in pairs
    ]


@pytest.mark.slow
def test_the_indexing_commands_of_the_cli_page_run(tmp_path: Path) -> None:
    root = fresh_clone(tmp_path)
    commands = shell_commands(section(REPO / "docs" / "cli.md", "Indexing a gallery"))
    assert len(commands) >= 8, "the indexing examples of docs/cli.md are gone"
    for command in commands:
        run_ok(command, root)
    assert json.loads((root / "build.json").read_text())["indexed"] == 2
