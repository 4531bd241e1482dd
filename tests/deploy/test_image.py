"""What can be checked of the image without a Docker engine: the Dockerfile pins its base image by digest,
installs only hash-locked wheels, ships no pip; the build context excludes what it must; the lock files pin
exactly what pyproject.toml pins."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from deploy_support import DEPLOY, ROOT, one, render

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
VENV = "/opt/epp"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# --- Dockerfile ---------------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, rest = line.strip().partition(" ")
            out.append((keyword.upper(), " ".join(rest.split())))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def resolved_from(rest: str) -> str:
    args = {}
    for keyword, value in instructions():
        if keyword == "ARG" and "=" in value:
            name, _, default = value.partition("=")
            args[name] = default
    image = rest.split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)


def test_every_stage_starts_from_a_digest_pinned_python_311_slim() -> None:
    froms = [rest for keyword, rest in instructions() if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    for rest in froms:
        image = resolved_from(rest)
        assert DIGEST.search(image), f"FROM {image} is not pinned by digest"
        assert image.startswith("python:3.11-slim@")
    assert len({resolved_from(rest) for rest in froms}) == 1, "the venv's python symlink needs the same base"


def test_builder_installs_only_hash_locked_wheels() -> None:
    builder = " ".join(rest for keyword, rest in stages()[0] if keyword == "RUN")
    assert f"python -m venv {VENV}" in builder
    lock_install = re.search(r"pip install ([^&]*)-r deploy/requirements\.lock", builder)
    assert lock_install and "--require-hashes" in lock_install.group(1)
    assert "--only-binary=:all:" in lock_install.group(1)
    assert "--no-build-isolation" in builder and "-r deploy/requirements-build.lock" in builder
    assert re.search(rf"{VENV}/bin/python -m pip uninstall --yes [^&]*\bpip\b", builder)


def test_final_stage_copies_only_the_venv_and_has_no_pip() -> None:
    final = stages()[-1]
    runs = " ".join(rest for keyword, rest in final if keyword == "RUN")
    assert "pip install" not in runs
    assert re.search(r"pip uninstall --yes .*\bsetuptools\b.*\bwheel\b.*\bpip\b", runs)
    assert "ensurepip" in runs
    copies = [rest for keyword, rest in final if keyword in ("COPY", "ADD")]
    assert copies == [f"--from=builder {VENV} {VENV}"]
    assert ("ENTRYPOINT", '["epp"]') in final


def test_image_user_is_the_deployments_user(kubectl: str) -> None:
    [user] = [rest for keyword, rest in stages()[-1] if keyword == "USER"]
    pod = one(render(kubectl, "base"), "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod['runAsUser']}:{pod['runAsGroup']}" == "65532:65532"


# --- .dockerignore ------------------------------------------------------------------------------------------


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories wins."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            excluded = not negate
    return excluded


@pytest.fixture(scope="module")
def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "tests/unit/test_config.py", "benchmarks/results/routing.json",
     "out/report.txt", ".mypy_cache/3.11/x.json", ".ruff_cache/x", "epp/__pycache__/cli.cpython-311.pyc",
     "epp.egg-info/PKG-INFO", "deploy/base/config.yaml"],
)  # fmt: skip
def test_dockerignore_keeps_out(path: str, ignore_patterns: list[str]) -> None:
    assert dockerignore_excludes(path, ignore_patterns)


def test_dockerignore_keeps_what_the_dockerfile_copies(ignore_patterns: list[str]) -> None:
    sources = []
    for keyword, rest in instructions():
        if keyword in ("COPY", "ADD") and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        path = ROOT / source
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        assert files, source
        for file in files:
            if "__pycache__" not in file.parts:
                relative = file.relative_to(ROOT).as_posix()
                assert not dockerignore_excludes(relative, ignore_patterns), relative


# --- lock files ---------------------------------------------------------------------------------------------


def lock_pins(path: Path) -> dict[str, tuple[str, int]]:
    """name → (version, number of hashes) of a `pip-compile --generate-hashes`-style lock file."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not line.startswith(" "):
            match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;\\]+)\s*(?:;[^\\]*)?\\?", stripped)
            assert match, f"{path.name}: not an exact pin: {stripped}"
            current = canonical(match.group(1))
            pins[current] = (match.group(2), 0)
        elif stripped.startswith("--hash=sha256:") and current:
            version, hashes = pins[current]
            pins[current] = (version, hashes + 1)
    return pins


def exact_pins(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", requirement)
        assert match, f"pyproject.toml pins everything exactly; {requirement!r} is not"
        pins[canonical(match.group(1))] = match.group(2)
    return pins


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_runtime_lock_pins_what_pyproject_pins(pyproject: dict) -> None:
    locked = lock_pins(DEPLOY / "requirements.lock")
    for name, version in exact_pins(pyproject["project"]["dependencies"]).items():
        assert name in locked, f"{name} is missing from deploy/requirements.lock: run deploy/update-lock.sh"
        assert locked[name][0] == version, f"{name}: lock has {locked[name][0]}, pyproject.toml {version}"
    assert "epp" not in locked
    for name, (_, hashes) in locked.items():
        assert hashes >= 1, f"{name} has no hash"


def test_build_lock_pins_the_build_backend(pyproject: dict) -> None:
    wanted = exact_pins(pyproject["build-system"]["requires"])
    locked = lock_pins(DEPLOY / "requirements-build.lock")
    assert {name: version for name, (version, _) in locked.items()} == wanted
    assert all(hashes for _, hashes in locked.values())
    listed = [
        line
        for line in (DEPLOY / "requirements-build.in").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert exact_pins(listed) == wanted


def test_locks_say_how_they_were_made() -> None:
    for name in ("requirements.lock", "requirements-build.lock"):
        assert "deploy/update-lock.sh" in (DEPLOY / name).read_text().split("\n", 3)[1]
    script = (DEPLOY / "update-lock.sh").read_text()
    assert "--generate-hashes" in script and "--python-version 3.11" in script and "x86_64" in script
