"""The prebuilt wheel (``make wheel``) installs and runs where there is no Rust toolchain.

Skipped unless ``FINESERVE_WHEEL`` names the wheel: building one takes minutes, so
``make wheel-test`` (and ``.ci/run``) build it once and point this test at it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WHEEL = (
    str(Path(os.environ["FINESERVE_WHEEL"]).resolve()) if os.environ.get("FINESERVE_WHEEL") else ""
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not WHEEL, reason="FINESERVE_WHEEL (a wheel from `make wheel`) not set"),
]

_RUST_TOOLS = ("cargo", "rustc", "rustup")


def _path_without_rust() -> str:
    """``PATH`` less ~/.cargo/bin and every directory holding cargo, rustc or rustup."""
    cargo_bin = Path.home() / ".cargo" / "bin"
    keep = []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or Path(d) == cargo_bin or ".cargo" in Path(d).parts:
            continue
        if any((Path(d) / tool).exists() for tool in _RUST_TOOLS):
            continue
        keep.append(d)
    return os.pathsep.join(keep)


def test_wheel_is_abi3_manylinux() -> None:
    name = Path(WHEEL).name
    assert Path(WHEEL).is_file(), WHEEL
    assert "-cp39-abi3-" in name, name
    assert "manylinux_2_17_x86_64" in name or "manylinux_2_17_aarch64" in name, name


def test_wheel_installs_and_blasts_the_mock_without_rust(tmp_path: Path) -> None:
    """A fresh venv, no cargo/rustc on PATH, no Rust environment variables: pip installs the
    wheel (never building anything: --only-binary :all:) and `fineserve blast` runs 20
    requests against the embedded mock, from the installed package, not this checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    path = os.pathsep.join([str(venv / "bin"), _path_without_rust()])
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CARGO", "RUSTUP", "RUST"))
        and k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env.update(PATH=path, VIRTUAL_ENV=str(venv), PIP_DISABLE_PIP_VERSION_CHECK="1")
    for tool in _RUST_TOOLS:
        assert shutil.which(tool, path=path) is None, f"{tool} still on PATH"

    def run(*cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            list(cmd), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"{cmd[:3]}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    python = str(venv / "bin" / "python")
    run(python, "-m", "pip", "install", "-q", "--only-binary", ":all:", WHEEL, timeout=900)
    where = run(python, "-c", "import fineserve; print(fineserve.__file__)", timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    out = tmp_path / "result.json"
    blast = run(
        str(venv / "bin" / "fineserve"),
        "blast",
        "--num-prompts",
        "20",
        "--disable-tqdm",
        "--output-file",
        str(out),
        timeout=300,
    )
    result = json.loads(out.read_text())
    assert (result["scheduled"], result["completed"], result["failed"]) == (20, 20, 0), blast.stdout
