"""The config file every overlay ships in its ConfigMap is one `epp check-config` accepts: the same
validation `epp serve --config` runs at start-up, through the real CLI (a subprocess of the installed `epp`).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from deploy_support import of_kind, overlay_names, render


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
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"epp check-config rejected {overlay}'s config.yaml:\n{output}"
