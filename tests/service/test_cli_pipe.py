"""A reader that stops early (`diml index info --json | head -c 1`) is not an error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_a_closed_pipe_ends_the_command_quietly(served: dict[str, Path]) -> None:
    diml = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"]
    command = [*diml, "index", "info", "--json", str(served["index"])]
    with subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        assert process.stdout.read(1) == b"{"
        process.stdout.close()  # the reader goes away before the command has written everything
        error = process.stderr.read().decode()
        code = process.wait(timeout=120)
    assert "Traceback" not in error, error
    assert "BrokenPipe" not in error, error
    assert code == 0, error
