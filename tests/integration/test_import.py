"""vmform import on the real daemon: domains virt-install would define (tests/corpus/domains/*.xml, generated
with ``virt-install --print-xml --dry-run --virt-type qemu``) are defined unmanaged, imported, and then plan
says "No changes.", apply does nothing, destroy removes them and nothing is left over. Never started."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from vmform.ownership import set_owner

CORPUS = Path(__file__).resolve().parent.parent / "corpus" / "domains"
CASES = sorted(CORPUS.glob("*.xml"))

NETWORK = """
networks:
  net: {name: PFX-net, mode: isolated, bridge: BRP0}
"""


def _files(directory: Path) -> None:
    """The disk images and shared directory the corpus points at."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("a.qcow2", "c.qcow2"):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(directory / name), "16M"], check=True)
    for name in ("a.raw", "b.raw", "seed.iso"):
        with open(directory / name, "wb") as image:
            image.truncate(16 * 1024 * 1024)
    (directory / "share").mkdir(exist_ok=True)


def _define(project: Any, xml: str) -> Any:
    return project.conn.defineXML(xml)


def test_corpus_is_varied() -> None:
    assert len(CASES) >= 10
    text = "".join(path.read_text() for path in CASES)
    for needle in ('firmware="efi"', 'machine="q35"', 'bus="sata"', 'bus="scsi"', 'device="cdrom"', "<rng",
                   "<tpm", "<filesystem", 'graphics type="spice"', 'graphics type="vnc"', "host-passthrough"):
        assert needle in text, needle


@pytest.mark.libvirt
@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_import_round_trip(project: Any, case: Path) -> None:
    project.write(NETWORK)
    project.apply()
    _files(project.pool_dir)
    name = f"{project.prefix}-{case.stem.replace('_', '-')}"
    xml = (case.read_text().replace("NAME_PLACEHOLDER", name).replace("DISKDIR_PLACEHOLDER", str(project.pool_dir))
           .replace("NETWORK_PLACEHOLDER", f"{project.prefix}-net"))
    _define(project, xml)

    imported = project.run("import", f"domain.{name}", check=True)
    print(imported.stdout)  # what import could not express, for the log
    assert f"domain.{name}: imported" in imported.stdout
    text = (project.root / "imported.yaml").read_text()
    assert text.startswith("# Imported by `vmform import`")
    assert "network: net" in text or "xml:" in text
    assert "not carried" not in text, text  # lossless: what no curated field says is under xml:

    plan = project.run("plan", check=True)
    assert "No changes." in plan.stdout, plan.stdout + (project.root / "imported.yaml").read_text()
    apply = project.run("apply", "--auto-approve", check=True)
    assert "No changes." in apply.stdout
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


@pytest.mark.libvirt
def test_import_volume_disk_and_pool(project: Any, conn: Any) -> None:
    """A disk that is a volume of a declared pool imports as 'volume:'; a hand-made pool goes into the ledger."""
    project.write(NETWORK + f"""
pools:
  images: {{name: PFX-images, path: {project.pool_dir}/images}}
volumes:
  root: {{name: PFX-root, pool: images, size: 16MiB}}
""")
    project.apply()
    other_dir = project.pool_dir / "other"
    other_dir.mkdir(parents=True)
    pool = conn.storagePoolDefineXML(
        f"<pool type='dir'><name>{project.prefix}-other</name><target><path>{other_dir}</path></target></pool>")
    pool.create()
    name = f"{project.prefix}-vol"
    _define(project, f"""<domain type='qemu'><name>{name}</name><memory>131072</memory>
      <os><type arch='x86_64'>hvm</type></os>
      <devices>
        <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/>
          <source pool='{project.prefix}-images' volume='{project.prefix}-root'/><target dev='vda' bus='virtio'/></disk>
        <interface type='network'><source network='{project.prefix}-net'/><model type='virtio'/></interface>
      </devices></domain>""")
    project.run("import", f"domain.{name}", f"pool.{project.prefix}-other", check=True)
    text = (project.root / "imported.yaml").read_text()
    assert "volume: root" in text and "pools:" in text
    assert "No changes." in project.run("plan", check=True).stdout
    assert "No changes." in project.run("apply", "--auto-approve", check=True).stdout
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


@pytest.mark.libvirt
def test_import_all_with_filter(project: Any) -> None:
    for suffix in ("a", "b"):
        _define(project, f"<domain type='qemu'><name>{project.prefix}-all-{suffix}</name><memory>65536</memory>"
                         "<os><type arch='x86_64'>hvm</type></os></domain>")
    result = project.run("import", "--all", "--filter", f"{project.prefix}-all-*", "-o", str(project.root / "all.yaml"),
                         check=True)
    assert result.stdout.count(": imported") == 2
    assert "No changes." in project.run("plan", check=True).stdout
    project.run("destroy", "--auto-approve", check=True)
    assert project.leftovers() == []


@pytest.mark.libvirt
def test_import_refuses_other_projects_object(project: Any) -> None:
    root = etree.fromstring(f"<domain type='qemu'><name>{project.prefix}-theirs</name><memory>65536</memory>"
                            "<os><type arch='x86_64'>hvm</type></os></domain>")
    set_owner(root, "someone-else", f"domain.{project.prefix}-theirs")
    _define(project, etree.tostring(root, encoding="unicode"))
    result = project.run("import", f"domain.{project.prefix}-theirs")
    assert result.code == 1
    assert "owned by vmform project 'someone-else'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (project.root / "imported.yaml").exists()


@pytest.mark.libvirt
def test_import_refuses_already_owned(project: Any) -> None:
    _define(project, f"<domain type='qemu'><name>{project.prefix}-mine</name><memory>65536</memory>"
                     "<os><type arch='x86_64'>hvm</type></os></domain>")
    project.run("import", f"domain.{project.prefix}-mine", "-o", str(project.root / "first.yaml"), check=True)
    again = project.run("import", f"domain.{project.prefix}-mine", "-o", str(project.root / "second.yaml"))
    assert again.code == 1 and "already" in again.stderr


@pytest.mark.libvirt
def test_import_missing_address(project: Any) -> None:
    result = project.run("import", f"domain.{project.prefix}-nope")
    assert result.code == 1
    assert f"no domain named '{project.prefix}-nope'" in result.stderr
    assert "Traceback" not in result.stderr
    bad = project.run("import", "volume.x")
    assert bad.code == 1 and "not an address like" in bad.stderr


@pytest.mark.libvirt
def test_import_refuses_to_overwrite(project: Any) -> None:
    _define(project, f"<domain type='qemu'><name>{project.prefix}-keep</name><memory>65536</memory>"
                     "<os><type arch='x86_64'>hvm</type></os></domain>")
    (project.root / "imported.yaml").write_text("# mine\n")
    result = project.run("import", f"domain.{project.prefix}-keep")
    assert result.code == 1 and "--force" in result.stderr
    assert (project.root / "imported.yaml").read_text() == "# mine\n"
    # Nothing was marked: with --force it imports.
    project.run("import", f"domain.{project.prefix}-keep", "--force", check=True)
    assert "No changes." in project.run("plan", check=True).stdout


@pytest.mark.libvirt
@pytest.mark.parametrize("description", ["cost {{ 7*7 }} units", "{{ ''.__class__ }}", "{% raw %} {# x #}"])
def test_imported_text_is_never_evaluated(project: Any, description: str) -> None:
    """Text read from the host that looks like an expression is written so that it loads back verbatim: the next
    plan neither rewrites it ("cost 49 units") nor fails to load it."""
    name = f"{project.prefix}-braces"
    root = etree.fromstring(f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
                            "<os><type arch='x86_64'>hvm</type></os></domain>")
    etree.SubElement(root, "description").text = description
    _define(project, etree.tostring(root, encoding="unicode"))
    imported = project.run("import", f"domain.{name}", check=True)
    assert f"domain.{name}: imported" in imported.stdout, imported.stdout
    assert "No changes." in project.run("plan", check=True).stdout
    assert "No changes." in project.run("apply", "--auto-approve", check=True).stdout
    assert etree.fromstring(project.conn.lookupByName(name).XMLDesc(0)).findtext("description") == description
    import yaml

    written = yaml.safe_load((project.root / "imported.yaml").read_text())["domains"][name]["description"]
    assert written != description and "{{ '{{' }}" in written or "{{ '{%' }}" in written  # escaped, not verbatim
