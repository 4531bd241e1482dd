"""The image's contents, built and run as deploy/Dockerfile and the Deployment would, without Docker.

Build (as the Dockerfile's builder stage): the build context is what /.dockerignore lets through
(pyproject.toml, README.md, epp/); a venv at /opt/epp gets deploy/requirements.lock with
`--require-hashes --only-binary=:all:`; a build venv gets deploy/requirements-build.lock; the epp wheel is
built with `--no-build-isolation` and installed `--no-deps --no-index`; pip, setuptools and wheel are removed
from /opt/epp. The interpreter is Debian's /usr/bin/python3.11 (the image's is python:3.11-slim's), and /opt
is an overlay inside a private mount namespace, so nothing is written to the machine's /opt.

Run: tests/deploy/image_harness.py (see its docstring) serves `epp serve --config /etc/epp/config.yaml`
with the base overlay's ConfigMap as 65532:65532 on a read-only root filesystem against the stand-in API
server, in fresh network and mount namespaces. Needs root, util-linux (`unshare`, `setpriv`, `mount`),
iproute2 (`ip`) and overlayfs, which the project's machines have; elsewhere the test is skipped, saying why.
Downloads from the package index (pip's cache makes reruns fast).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from deploy_support import DEPLOY, ROOT, config_of, render

PYTHON = (
    "/usr/bin/python3.11"  # Debian's CPython 3.11, readable by the non-root user (unlike a pyenv under /root)
)
TOOLS = ("unshare", "setpriv", "mount", "ip")

BUILD = """
set -eu
mount --make-rprivate /
mount -t overlay overlay -o lowerdir=/opt,upperdir="$W/opt-upper",workdir="$W/opt-work" /opt
mkdir -p /opt/epp
{python} -m venv /opt/epp
/opt/epp/bin/pip install --quiet --disable-pip-version-check --require-hashes --only-binary=:all: --no-deps \\
    -r "$R/deploy/requirements.lock"
{python} -m venv "$W/build"
"$W/build/bin/pip" install --quiet --disable-pip-version-check --require-hashes --only-binary=:all: \\
    --no-deps -r "$R/deploy/requirements-build.lock"
"$W/build/bin/pip" wheel --quiet --disable-pip-version-check --no-build-isolation --no-deps \\
    --wheel-dir "$W/wheels" "$W/context"
/opt/epp/bin/pip install --quiet --disable-pip-version-check --no-deps --no-index "$W"/wheels/epp-*.whl
/opt/epp/bin/python -m pip uninstall --quiet --yes setuptools wheel pip
/opt/epp/bin/epp check-config
"""


def missing_prerequisite() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs Linux and root (namespaces, mounts, setpriv to the pod's user)"
    for tool in TOOLS:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux / iproute2)"
    if not Path(PYTHON).is_file():
        return f"{PYTHON} is missing (Debian's python3.11 and python3.11-venv)"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--fork", "--", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode().strip()}"
    return None


@pytest.fixture(scope="module")
def image(kubectl: str) -> Iterator[Path]:
    """A work directory with opt-upper/epp (the image's venv), etc-upper/epp/config.yaml and the wheel."""
    reason = missing_prerequisite()
    if reason:
        pytest.skip(f"image contents test: {reason}")
    work = Path(tempfile.mkdtemp(prefix="epp-image-"))
    try:
        for name in ("opt-upper", "opt-work", "wheels", "context", "run-upper", "etc-upper/epp"):
            (work / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "pyproject.toml", work / "context")
        shutil.copy(ROOT / "README.md", work / "context")
        shutil.copytree(
            ROOT / "epp", work / "context" / "epp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        config = render(kubectl, "overlays/envoy-ai-gateway")
        configmap = next(o for o in config if o["kind"] == "ConfigMap" and "config.yaml" in o.get("data", {}))
        (work / "etc-upper" / "epp" / "config.yaml").write_text(configmap["data"]["config.yaml"])
        assert config_of(config)["leader_election"]["enabled"]
        done = subprocess.run(
            ["unshare", "--mount", "--fork", "--", "sh", "-c", BUILD.format(python=PYTHON)],
            env={**os.environ, "W": str(work), "R": str(ROOT), "PIP_NO_INPUT": "1"},
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert done.returncode == 0, (
            f"building the image contents failed:\n{done.stdout}\n{done.stderr[-4000:]}"
        )
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_the_wheel_holds_only_the_picker(image: Path) -> None:
    [wheel] = list((image / "wheels").glob("epp-*.whl"))
    version = wheel.name.split("-")[1]
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"epp", f"epp-{version}.dist-info"}  # no lab, tests, benchmarks
    site = next((image / "opt-upper" / "epp" / "lib").glob("python3.11/site-packages"))
    installed = {p.name.split("-")[0].lower() for p in site.glob("*.dist-info")}
    assert not installed & {"pip", "setuptools", "wheel", "epp_lab"}
    lock = (DEPLOY / "requirements.lock").read_text().splitlines()
    locked = {
        line.split("==")[0].lower().replace("_", "-") for line in lock if "==" in line and line[0] != " "
    }
    assert {n.replace("_", "-") for n in installed} == locked | {"epp"}


def test_serves_as_non_root_on_a_read_only_filesystem_against_the_api_server(
    image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = Path(__file__).with_name("image_harness.py")
    command = ["unshare", "--net", "--mount", "--fork", "--", sys.executable, str(harness)]
    done = subprocess.run(
        [*command, json.dumps({"work": str(image)})], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"harness failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    logs = "\n".join(report["logs"])
    assert "error" not in report, f"{report['error']}\n{logs}"
    assert (report["uid"], report["gid"]) == ("65532", "65532"), logs
    assert int(report["cap_eff"], 16) == 0 and report["no_new_privs"] == "1"
    # The deploy config's bind addresses: admin on localhost only, the rest on every interface (gRPC serves
    # 0.0.0.0 on a dual-stack wildcard socket, "::").
    wildcard = {"0.0.0.0", "::"}
    listen = report["listen"]
    assert listen["9004"] == "127.0.0.1", listen
    assert {listen["9002"], listen["9003"], listen["9090"]} <= wildcard, listen
    assert report["lease_holder"] == "llama-epp-0", logs
    assert report["endpoints_rc"] == 0 and "127.0.0.1:" in report["endpoints_out"], report["endpoints_out"]
    assert report["installers_in_image"] == "[]" and report["write_opt"] is True
    # The calls the Role grants (list/watch, the Lease's get/update/create), over TLS with the pod's token.
    assert {"list pods", "watch pods", "list inferencepools", "get leases"} <= set(report["requests"])
    assert report["exit_code"] == 0, logs
    assert "Traceback" not in logs and "ERROR" not in logs, logs
    with capsys.disabled():
        print(
            f"\n[image] ready after {report['ready_after_s']} s; SIGTERM -> Lease released after "
            f"{report['lease_released_after_s']} s, exited after {report['exited_after_s']} s (drain_s 5)"
        )
