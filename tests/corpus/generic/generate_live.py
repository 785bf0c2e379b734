"""Writes live-*.xml: the corpus documents as libvirt itself formats them after defining them on the
in-memory test driver (test:///default; nothing on the host changes). Run from the repository root:
.venv/bin/python tests/corpus/generic/generate_live.py"""

from __future__ import annotations

import re
from pathlib import Path

import libvirt

HERE = Path(__file__).resolve().parent


def _sources(folder: str) -> list[Path]:
    return sorted(p for p in (HERE / folder).glob("*.xml") if not p.name.startswith("live-"))


def main() -> None:
    libvirt.registerErrorHandler(lambda *_: None, None)
    conn = libvirt.open("test:///default")
    for path in _sources("domains"):
        xml = re.sub(r"<domain type=['\"]\w+['\"]", "<domain type='test'", path.read_text(), count=1)
        domain = conn.defineXML(xml)
        (HERE / "domains" / f"live-{path.name}").write_text(domain.XMLDesc(libvirt.VIR_DOMAIN_XML_SECURE) + "\n")
    (HERE / "domains" / "live-test-driver.xml").write_text(conn.lookupByName("test").XMLDesc(0) + "\n")
    (HERE / "networks" / "live-test-driver.xml").write_text(conn.networkLookupByName("default").XMLDesc(0) + "\n")
    (HERE / "pools" / "live-test-driver.xml").write_text(conn.storagePoolLookupByName("default-pool").XMLDesc(0) + "\n")
    for path in _sources("networks"):
        xml = path.read_text().replace("<name>default</name>", "<name>corpus-default</name>")
        network = conn.networkDefineXML(xml)
        (HERE / "networks" / f"live-{path.name}").write_text(network.XMLDesc(0) + "\n")
    for path in _sources("pools"):
        xml = re.sub(r"<name>[^<]*</name>", f"<name>{path.stem}</name>", path.read_text(), count=1)
        pool = conn.storagePoolDefineXML(xml)
        (HERE / "pools" / f"live-{path.name}").write_text(pool.XMLDesc(0) + "\n")
    conn.close()


if __name__ == "__main__":
    main()
