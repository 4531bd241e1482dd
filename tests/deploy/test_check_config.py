"""The config file every overlay ships in its ConfigMap is one `epp check-config` accepts: the same
validation `epp serve --config` runs at start-up, through the real CLI (a subprocess of the installed `epp`).

PENDING KEYS: the base config uses keys that are being added to epp's config model (server.metrics_host,
server.admin_host, server.admin_port, server.drain_s and the leader_election section). Until they land,
check-config rejects them with "Extra inputs are not permitted"; this test then reports xfail naming them,
and fails on any other error. Once the keys exist it simply passes; then delete PENDING_KEYS.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import of_kind, overlay_names, render

PENDING_KEYS = {
    "server.metrics_host",
    "server.admin_host",
    "server.admin_port",
    "server.drain_s",
    "leader_election",
}


def epp_cli() -> Path:
    cli = Path(sys.executable).parent / "epp"  # the console script installed with this interpreter's epp
    if not cli.is_file():
        pytest.skip(f"no epp command beside {sys.executable}: pip install -e . into this environment")
    return cli


@pytest.mark.parametrize("overlay", overlay_names())
def test_configmap_config_passes_epp_check_config(kubectl: str, overlay: str, tmp_path: Path) -> None:
    [configmap] = [o for o in of_kind(render(kubectl, overlay), "ConfigMap") if "config.yaml" in o["data"]]
    path = tmp_path / "config.yaml"
    path.write_text(configmap["data"]["config.yaml"])
    done = subprocess.run(
        [str(epp_cli()), "check-config", str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode == 0:
        return
    problems = [line.strip() for line in done.stderr.splitlines() if ": " in line and line.startswith("  ")]
    pending = [
        p
        for p in problems
        if p.endswith("Extra inputs are not permitted") and p.split(":")[0] in PENDING_KEYS
    ]
    if problems and pending == problems:
        pytest.xfail(
            f"epp's config model does not know these keys yet: {', '.join(p.split(':')[0] for p in pending)}"
        )
    pytest.fail(f"epp check-config rejected {overlay}'s config.yaml:\n{done.stdout}{done.stderr}")
