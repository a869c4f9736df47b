"""The K3s/KubeEdge manifest's ConfigMap holds a config the appliance accepts (the same loader as
`appliance check-config`), with the API the probes need on the pod's address."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

from appliance.config import parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

MANIFEST = Path(__file__).resolve().parents[2] / "image" / "k8s" / "appliance.yaml"


def test_the_configmap_config_loads_and_serves_the_probed_port(tmp_path: Path) -> None:
    text = MANIFEST.read_text(encoding="utf-8")
    block = re.search(r"appliance\.toml: \|\n((?:    .*\n|\n)+)", text)
    assert block is not None
    cfg = parse_config(
        tomllib.loads(textwrap.dedent(block.group(1))), source="appliance.yaml", base_dir=tmp_path
    )
    assert cfg.api.enabled and cfg.api.listen == "0.0.0.0"
    probe_ports = set(re.findall(r"containerPort: (\d+)", text))
    assert str(cfg.api.port) in probe_ports
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", text).group(1))  # type: ignore[union-attr]
    assert cfg.appliance.drain_timeout_s < grace
