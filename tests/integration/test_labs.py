"""The example labs (examples/k8s-lab, ceph-lab, router-lab, baremetal-lab) on the real daemon, as issue 12 has
them: applied with the test's names, TCG and small memory, the management networks forced to isolated mode by a
variable, the base image served by an HTTP server on 127.0.0.1 with its sha256; then re-planned as "No changes."
and destroyed to nothing."""

from __future__ import annotations

import functools
import hashlib
import http.server
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    www = tmp_path_factory.mktemp("www")
    image = www / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/base.qcow2", hashlib.sha256(image.read_bytes()).hexdigest()
    finally:
        server.shutdown()


def copy_lab(project: Any, lab: str) -> None:
    """The lab's manifests in the test's project, its module sources pointing at the repository."""
    source = REPO / "examples" / lab
    for path in source.rglob("*.yaml"):
        target = project.root / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text().replace("../../../modules/", f"{REPO}/modules/").replace("../../modules/", f"{REPO}/modules/")
        target.write_text(text.replace("PFX", project.prefix))


# What each lab makes: (its domains, running or not, how many resources).
LABS = {
    "k8s-lab": (["cp1", "cp2", "cp3", "lb", "worker1", "worker2"], "running", 21),
    "ceph-lab": (["ceph1", "ceph2", "ceph3"], "running", 18),
    "router-lab": (["r1", "r2", "r3"], "running", 15),
    "baremetal-lab": (["node1", "node2", "node3"], "stopped", 8),
}


@pytest.mark.parametrize("lab", list(LABS))
def test_lab_applies_converges_and_destroys_to_nothing(lab: str, project: Any, conn: Any, image_url: tuple[str, str],
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFORM_CACHE_DIR", str(tmp_path / "cache"))
    p = project.prefix
    copy_lab(project, lab)
    declared = yaml.safe_load((project.root / "main.yaml").read_text())["variables"]
    settings: dict[str, Any] = {"prefix": p, "pool_path": str(project.pool_dir), "subnet": project.subnet,
                                "domain_type": "qemu", "memory": "64MiB", "base_image": image_url[0],
                                "base_sha256": image_url[1], "network_mode": "isolated", "lb_memory": "64MiB",
                                "osd_size": "64MiB", "disk_size": "64MiB"}
    (project.root / "test.vars").write_text(yaml.safe_dump({k: v for k, v in settings.items() if k in declared}))
    variables = ("-var-file", str(project.root / "test.vars"))
    names, state, count = LABS[lab]

    applied = project.run("apply", "--auto-approve", *variables, check=True)
    assert f"Apply complete! Resources: {count} added, 0 changed, 0 destroyed." in applied.stdout, applied.stdout
    domains = {d.name(): d for d in conn.listAllDomains() if d.name().startswith(p)}
    assert sorted(domains) == [f"{p}-{name}" for name in names]
    assert {bool(d.isActive()) for d in domains.values()} == {state == "running"}
    for network in conn.listAllNetworks():
        if network.name().startswith(p):
            assert "<forward" not in network.XMLDesc(0), network.name()  # nothing leaves the machine
    assert "No changes." in project.run("plan", *variables, check=True).stdout

    if lab == "ceph-lab":
        xml = domains[f"{p}-ceph1"].XMLDesc(0)
        assert xml.count("bus='scsi'") == 2 and "model='virtio-scsi'" in xml
    if lab == "router-lab":
        xml = domains[f"{p}-r1"].XMLDesc(0)
        assert xml.count("<model type='e1000'/>") == 3
        assert "<mtu size='9000'/>" in conn.networkLookupByName(f"{p}-r1-r2").XMLDesc(0)
    if lab == "baremetal-lab":
        xml = domains[f"{p}-node1"].XMLDesc(0)
        assert "firmware='efi'" in xml and "<boot dev='network'/>" in xml and "52:54:00:b0:00:01" in xml
    if lab == "k8s-lab":
        inventory = yaml.safe_load(project.run("inventory", *variables, check=True).stdout)
        assert sorted(inventory["all"]["children"]["control_plane"]["hosts"]) == [f"{p}-cp1", f"{p}-cp2", f"{p}-cp3"]

    project.run("destroy", "--auto-approve", *variables, check=True)
    assert project.leftovers() == []
