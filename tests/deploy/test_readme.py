"""deploy/README.md stays a complete map of deploy/ and keeps its pointers to upstream documentation."""

from __future__ import annotations

from deploy_support import DEPLOY


def test_readme_lists_every_file_and_directory() -> None:
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.iterdir()):
        if path.name != "README.md":
            shown = f"{path.name}/" if path.is_dir() else path.name
            assert f"`{shown}" in readme, f"deploy/README.md does not mention {shown}"


def test_readme_cites_the_ai_gateway_inferencepool_addon() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "https://aigateway.envoyproxy.io/docs/getting-started/prerequisites" in readme
    assert "envoy-gateway-values-addon.yaml" in readme
