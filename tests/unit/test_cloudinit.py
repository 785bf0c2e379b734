"""cloud-init seeds: the ISO read back with pycdlib, and user-data kept out of every plan text, JSON and show."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from vmform.cli import main
from vmform.diff import compare
from vmform.live import LiveObject, seed_object
from vmform.manifest.loader import load_manifests
from vmform.model import Manifests
from vmform.plan import Action, Change, Plan
from vmform.planview import plan_lines
from vmform.render.validate import validate
from vmform.render.xml import render_domain, render_resource, to_text
from vmform.seed import LABEL, build_iso, read_iso, seed_files
from vmform.sensitive import fingerprint, masked

SECRET = "hunter2-do-not-print"
MANIFEST = f"""
pools:
  lab: {{path: /var/lib/vmform/lab}}
cloudinit:
  seed:
    pool: lab
    user_data: {{chpasswd: {{list: "root:{SECRET}"}}}}
    meta_data: {{local-hostname: web}}
    network_config: {{version: 2, ethernets: {{eth0: {{dhcp4: true}}}}}}
domains:
  web:
    type: qemu
    allow: [host_paths]
    kernel: /var/lib/vmform/boot/vmlinuz
    initrd: /var/lib/vmform/boot/initrd.gz
    cmdline: console=ttyS0
    console_log: true
    cloudinit: seed
"""


def test_seed_iso_holds_the_files_under_their_names_with_label_cidata(load_files: Callable[..., Manifests]) -> None:
    desired = load_files({"m.yaml": MANIFEST}).resources["cloudinit.seed"].desired
    image = build_iso(seed_files(desired))
    label, files = read_iso(image)
    assert label == LABEL == "cidata"
    assert set(files) == {"user-data", "meta-data", "network-config"}
    assert files["user-data"].decode().startswith("#cloud-config\n")
    assert SECRET in files["user-data"].decode()
    meta = files["meta-data"].decode()
    assert "local-hostname: web" in meta and f"instance-id: {desired['meta_data']['instance-id']}" in meta
    assert files["network-config"].decode() == "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n"
    # The primary volume descriptor (sector 16) carries the label cloud-init's NoCloud looks for.
    assert image[16 * 2048 + 40: 16 * 2048 + 46] == b"cidata"
    assert len(image) % 2048 == 0


def test_seed_without_network_config_has_two_files() -> None:
    files = seed_files({"user_data": "#cloud-config\n", "meta_data": {"instance-id": "i-1"}, "network_config": None})
    assert set(read_iso(build_iso(files))[1]) == {"user-data", "meta-data"}


def test_instance_id_follows_the_content(load_files: Callable[..., Manifests]) -> None:
    first = load_files({"m.yaml": MANIFEST}).resources["cloudinit.seed"].desired["meta_data"]["instance-id"]
    again = load_files({"m.yaml": MANIFEST}).resources["cloudinit.seed"].desired["meta_data"]["instance-id"]
    changed = load_files({"m.yaml": MANIFEST.replace(SECRET, "other")}).resources["cloudinit.seed"]
    assert first == again
    assert changed.desired["meta_data"]["instance-id"] != first


def test_user_data_from_a_file_relative_to_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "sub" / "m.yaml"
    manifest.parent.mkdir()
    manifest.write_text("pools: {lab: {path: /var/lib/vmform/lab}}\ncloudinit:\n  seed: {pool: lab, user_data: {file: ud.cfg}}\n")
    (tmp_path / "sub" / "ud.cfg").write_text("#cloud-config\nruncmd: [true]\n")
    manifests = load_manifests("unit", [manifest], root=tmp_path)
    assert manifests.resources["cloudinit.seed"].desired["user_data"] == "#cloud-config\nruncmd: [true]\n"


def test_domain_with_kernel_boot_seed_and_console_log_renders_valid_xml(load_files: Callable[..., Manifests]) -> None:
    resource = load_files({"m.yaml": MANIFEST}).resources["domain.web"]
    root = render_domain(resource.libvirt_name, resource.desired, "unit", resource.address)
    validate("domain", root, resource.address)
    assert root.findtext("os/kernel") == "/var/lib/vmform/boot/vmlinuz"
    assert root.findtext("os/initrd") == "/var/lib/vmform/boot/initrd.gz"
    assert root.findtext("os/cmdline") == "console=ttyS0"
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom.find("source").get("volume") == "seed.iso" and cdrom.find("readonly") is not None
    assert cdrom.find("target").get("bus") == "ide"
    assert root.find("devices/serial/log").get("file") == "/var/log/libvirt/qemu/web-console.log"
    assert root.find("devices/console/log").get("file") == "/var/log/libvirt/qemu/web-console.log"


def _plan_texts(plan: Plan) -> tuple[str, str]:
    return "\n".join(plan_lines(plan)), json.dumps(plan.to_json())


def test_user_data_is_masked_in_a_create_plan(load_files: Callable[..., Manifests]) -> None:
    seed = load_files({"m.yaml": MANIFEST}).resources["cloudinit.seed"]
    plan = Plan("unit", "test:///default", (Change(seed.address, "cloudinit", "seed", Action.CREATE, after=seed.desired),))
    text, as_json = _plan_texts(plan)
    for shown in (text, as_json):
        assert SECRET not in shown and "chpasswd" not in shown
        assert masked(seed.desired["user_data"]) in shown
    assert masked(seed.desired["user_data"]).startswith("(sensitive, sha256:")
    assert f"{len(seed.desired['user_data'].encode())} bytes)" in text


def test_user_data_is_masked_in_a_replace_plan(load_files: Callable[..., Manifests]) -> None:
    seed = load_files({"m.yaml": MANIFEST}).resources["cloudinit.seed"]
    old = {"user_data": fingerprint("#cloud-config\nold: true\n"), "meta_data": {"instance-id": "i-old"},
           "network_config": None}
    volume = LiveObject("volume", "seed.iso", {"pool": "lab"}, {"pool": "lab", "path": "/var/lib/vmform/lab/seed.iso"},
                        address=seed.address, active=True)
    live = seed_object(volume, {"seed": old})
    fields, forcing, _ = compare(seed, live)
    assert {"user_data", "meta_data", "network_config"} <= set(forcing)
    change = Change(seed.address, "cloudinit", "seed", Action.DELETE_THEN_CREATE, before=live.values,
                    after=seed.desired, fields=tuple(fields), reason="user_data changed")
    text, as_json = _plan_texts(Plan("unit", "test:///default", (change,)))
    for shown in (text, as_json):
        assert SECRET not in shown and "chpasswd" not in shown
        assert masked(old["user_data"]) in shown and masked(seed.desired["user_data"]) in shown


def _project(tmp_path: Path) -> Path:
    (tmp_path / "vmform.toml").write_text('[project]\nname = "unit"\nuri = "test:///default"\n')
    (tmp_path / "main.yaml").write_text(MANIFEST)
    return tmp_path


def test_show_masks_user_data_unless_sensitive(tmp_path: Path) -> None:
    root = _project(tmp_path)
    runner = CliRunner()
    masked_out = runner.invoke(main, ["-C", str(root), "--no-color", "show", "cloudinit.seed"])
    assert masked_out.exit_code == 0, masked_out.output
    assert SECRET not in masked_out.output and "(sensitive, sha256:" in masked_out.output
    assert "local-hostname: web" in masked_out.output
    everything = runner.invoke(main, ["-C", str(root), "--no-color", "show"])
    assert SECRET not in everything.output and "# domain.web" in everything.output and "# pool.lab" in everything.output
    shown = runner.invoke(main, ["-C", str(root), "--no-color", "show", "--sensitive", "cloudinit.seed"])
    assert shown.exit_code == 0 and SECRET in shown.output
    wrong = runner.invoke(main, ["-C", str(root), "show", "cloudinit.sede"])
    assert wrong.exit_code == 1 and "did you mean 'cloudinit.seed'" in wrong.output


def test_seed_renders_as_a_raw_volume_sized_to_its_image(load_files: Callable[..., Manifests]) -> None:
    seed = load_files({"m.yaml": MANIFEST}).resources["cloudinit.seed"]
    root = render_resource("cloudinit", seed.libvirt_name, seed.desired, "unit", seed.address)
    validate("cloudinit", root, seed.address)
    assert root.findtext("name") == "seed.iso"
    assert root.find("target/format").get("type") == "raw"
    assert int(root.findtext("capacity")) == len(build_iso(seed_files(seed.desired)))
    assert SECRET not in to_text(root)
