"""Hostile input, round two (docs/SECURITY.md): every case is refused with one line at the manifest's file:line,
before anything is built or read; the legitimate ones pass with their opt-in."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from vmform.errors import ManifestErrors, ProjectError
from vmform.manifest.loader import load_manifests
from vmform.manifest.variables import VariableInputs


def load(root: Path, text: str, settings: dict[str, Any] | None = None, name: str = "m.yaml") -> Any:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return load_manifests("unit", [path], root, settings or {}, VariableInputs(environ={}))


def errors(root: Path, text: str, settings: dict[str, Any] | None = None) -> list[str]:
    with pytest.raises(ManifestErrors) as info:
        load(root, text, settings)
    return [str(e) for e in info.value.errors]


# --- expression limits -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("expression", "limit"), [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{{ 'a'|center(2000000000) }}", "center() with a width over"),
    ("{{ 'a'.ljust(2000000000) }}", "ljust() with a width over"),
    ("{{ '%0999999999d' % 1 }}", "a format width of 999999999"),
    ("{{ '%*d' % (999999999, 1) }}", "a format width over"),
    ("{{ '{:>999999999}'.format(1) }}", "a format width of 999999999"),
    ("{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(1) }}", "calls nested deeper than"),
    ("{% set ns = namespace(x='a') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}{{ ns.x }}",
     "the text would be larger than"),
    ("{% for i in range(1000) %}{{ 'x' * 999999 }}{% endfor %}", "the text would be larger than"),
    ("{{ ('a' * 900000) | replace('a', 'bb') }}", "replace() would build"),
    ("{{ (['a' * 1000] * 1000) | join(',') }}", "join() would build"),
    ("{{ 2 ** 100000 }}", "an exponent over 256"),
])
def test_an_expression_stops_at_its_limit_at_once_with_one_line(tmp_path: Path, expression: str, limit: str) -> None:
    text = f"domains:\n  web:\n    description: \"{expression}\"\n"
    started = time.monotonic()
    found = errors(tmp_path, text)
    assert time.monotonic() - started < 10  # refused at once, not after the work (the checks happen first)
    assert len(found) == 1, found
    assert found[0].startswith("m.yaml:3:18: expression stopped at a limit ("), found
    assert limit in found[0], found
    assert "\n" not in found[0]


@pytest.mark.parametrize(("expression", "expected"), [
    ("{% for i in range(3) %}{{ i }}{% endfor %}", "012"),
    ("web-{{ '%02d' % 7 }}", "web-07"),
    ("{{ 'a' | center(5) }}|", "  a  |"),
    ("{{ '{:>4}'.format('x') }}", "   x"),
    ("{% macro twice(s) %}{{ s ~ s }}{% endmacro %}{{ twice('ab') }}", "abab"),
])
def test_ordinary_expressions_are_not_limited(tmp_path: Path, expression: str, expected: str) -> None:
    manifests = load(tmp_path, f"domains:\n  web:\n    description: \"{expression}\"\n")
    assert manifests.resources["domain.web"].desired["description"] == expected


def test_one_template_text_is_compiled_once_for_every_instance() -> None:
    from vmform.manifest.expressions import _compiled, evaluate

    _compiled.cache_clear()
    for index in range(50):
        assert evaluate("w-{{ index }}", {"index": index}) == f"w-{index}"
    assert _compiled.cache_info().misses == 1


# --- input limits --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "domains: " + "[" * 500 + "\n",
    "domains: " + "[" * 500 + "]" * 500 + "\n",
    "domains:\n  a: {description: \"x\x07\"}\n",
    "domains:\n" + "".join("  " * (depth + 1) + f"k{depth}:\n" for depth in range(100)),
])
def test_deep_or_bad_yaml_is_one_error_not_a_traceback(tmp_path: Path, text: str) -> None:
    found = errors(tmp_path, text)
    assert len(found) == 1 and found[0].startswith("m.yaml:"), found
    assert "nested deeper than 64 levels" in found[0] or "is not allowed in YAML" in found[0], found
    assert "\n" not in found[0]


# --- host paths: pools --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/etc", "/etc/libvirt", "/usr/share", "/boot", "/root", "/proc", "/sys", "/dev/shm",
                                  "/run/x", "/var/lib/libvirt", "/var/lib/libvirt/qemu", "/", "/var"])
def test_a_system_directory_is_never_a_pool_even_with_the_opt_in(tmp_path: Path, path: str) -> None:
    found = errors(tmp_path, f"pools:\n  p: {{type: dir, path: {path}, allow: [host_paths]}}\n")
    assert len(found) == 1 and found[0].startswith("m.yaml:2:"), found
    assert ("system directory" in found[0] or "not an acceptable pool directory" in found[0]), found


def test_the_shadow_attack_is_refused(tmp_path: Path) -> None:
    """A pool at /etc used to turn the host-path check off for a disk at /etc/shadow."""
    found = errors(tmp_path, "pools:\n  p: {type: dir, path: /etc}\n"
                             "domains:\n  vm: {disks: [{path: /etc/shadow, format: raw}]}\n")
    assert found == ["m.yaml:2:24: '/etc' is inside the system directory /etc: never a pool directory vmform makes"]


def test_a_pool_outside_the_roots_needs_the_opt_in_or_a_widening(tmp_path: Path) -> None:
    text = "pools:\n  p: {type: dir, path: /srv/images}\n"
    found = errors(tmp_path, text)
    assert len(found) == 1 and found[0].startswith("m.yaml:2:24: pool directory /srv/images is outside the pool roots ("), found
    assert found[0].endswith("refused unless the resource says allow: [host_paths]")
    assert load(tmp_path, text.replace("}", ", allow: [host_paths]}"))
    assert load(tmp_path, text, settings={"project": {"pool_roots": ["/srv"]}})
    assert load(tmp_path, "pools:\n  p: {type: dir, path: /var/lib/libvirt/images/lab}\n")
    assert load(tmp_path, "pools:\n  p: {type: dir, path: /var/lib/vmform/lab}\n")


@pytest.mark.parametrize("roots", [["/etc"], ["/"], ["relative"], ["/var/lib/libvirt"], "/srv", [1]])
def test_pool_roots_cannot_widen_to_system_directories(tmp_path: Path, roots: Any) -> None:
    (tmp_path / "vmform.toml").write_text(f"[project]\nname = 'p'\npool_roots = {roots!r}\n".replace("'", '"'))
    from vmform.project import load_project

    with pytest.raises(ProjectError) as info:
        load_project(tmp_path)
    assert "pool_roots" in str(info.value) and "\n" not in str(info.value)


def test_a_disk_in_a_pool_directory_must_be_a_declared_volume(tmp_path: Path) -> None:
    base = "pools:\n  p: {path: /var/lib/vmform/lab}\nvolumes:\n  root: {pool: p, size: 1GiB}\n"
    assert load(tmp_path, base + "domains:\n  vm: {disks: [{path: /var/lib/vmform/lab/root, format: qcow2}]}\n")
    found = errors(tmp_path, base + "domains:\n  vm: {disks: [{path: /var/lib/vmform/lab/other, format: raw}]}\n")
    assert found == ["m.yaml:6:23: disk vda: /var/lib/vmform/lab/other is in a managed pool's directory but is not one "
                     "of the volumes the manifests declare there; refused unless the resource says allow: [host_paths]"]


# --- host paths: local files a manifest reads ---------------------------------------------------------------

def test_a_volume_source_outside_the_project_needs_the_opt_in(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "outside.raw").write_bytes(b"x" * 1024)
    (project / "inside.raw").write_bytes(b"x" * 1024)
    os.symlink(tmp_path / "outside.raw", project / "link.raw")
    pools = "pools:\n  p: {path: /var/lib/vmform/lab}\n"
    for source in ("../../../../../../etc/shadow", "../outside.raw", "link.raw", "/etc/shadow"):
        found = errors(project, pools + f"volumes:\n  v: {{pool: p, format: raw, source: {source}}}\n")
        assert len(found) == 1, found
        assert found[0].startswith(f"m.yaml:4:37: source image '{source}' is outside the project directory"), found
        assert found[0].endswith("refused unless the resource says allow: [host_paths]")
    assert load(project, pools + "volumes:\n  v: {pool: p, format: raw, source: inside.raw}\n")
    allowed = load(project, pools + "volumes:\n  v: {pool: p, format: raw, source: ../outside.raw, allow: [host_paths]}\n")
    assert allowed.resources["volume.v"].desired["source"] == str(tmp_path / "outside.raw")


def test_seed_files_and_stylesheets_outside_the_project_are_refused(tmp_path: Path) -> None:
    pools = "pools:\n  p: {path: /var/lib/vmform/lab}\n"
    found = errors(tmp_path, pools + "cloudinit:\n  s: {pool: p, user_data: {file: /etc/passwd}}\n")
    assert len(found) == 1 and "user_data file '/etc/passwd' is outside the project directory" in found[0], found
    found = errors(tmp_path, "domains:\n  vm: {xslt: {file: /etc/passwd}}\n")
    assert len(found) == 1 and "the stylesheet '/etc/passwd' is outside the project directory" in found[0], found


# --- host paths: everything libvirt's schema types as a path ------------------------------------------------

@pytest.mark.parametrize(("xml", "what"), [
    ("{devices: {channel: [{type: unix, source: [{mode: bind, path: /etc/evil.sock}], target: {type: virtio, name: x}}]}}",
     "channel type='unix': /etc/evil.sock is outside the pools"),
    ("{os: {loader: {readonly: 'yes', type: pflash, _text: /etc/shadow}}}", "os/loader: /etc/shadow is outside the pools"),
    ("{os: {nvram: /root/vars.fd}}", "os/nvram: /root/vars.fd is outside the pools"),
    ("{devices: {graphics: [{type: vnc, socket: /etc/vnc.sock}]}}", "devices/graphics/@socket: /etc/vnc.sock"),
])
def test_every_host_path_the_schema_knows_needs_the_opt_in(tmp_path: Path, xml: str, what: str) -> None:
    text = f"domains:\n  vm:\n    xml: {xml}\n"
    found = errors(tmp_path, text)
    assert len(found) == 1 and what in found[0], found
    assert found[0].startswith("m.yaml:3:") and found[0].endswith("refused unless the resource says allow: [host_paths]")
    assert load(tmp_path, text.replace("  vm:\n", "  vm:\n    allow: [host_paths]\n"))


def test_firmware_and_libvirts_own_paths_need_no_opt_in(tmp_path: Path) -> None:
    assert load(tmp_path, "domains:\n  vm:\n    xml: {os: {loader: {readonly: 'yes', type: pflash, _text: "
                          "/usr/share/OVMF/OVMF_CODE.fd}, nvram: /var/lib/libvirt/qemu/nvram/vm_VARS.fd}}\n")


def test_a_network_tftp_root_is_a_host_path(tmp_path: Path) -> None:
    text = ("networks:\n  n:\n    xml: {ip: [{address: 10.9.9.1, netmask: 255.255.255.0, tftp: {root: /etc}}]}\n")
    found = errors(tmp_path, text)
    assert len(found) == 1 and "ip/tftp/@root: /etc is outside the pools" in found[0], found


# --- import escaping ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["cost {{ 7*7 }} units", "{{ ''.__class__ }}", "{% raw %}{# c #}", "a }} {{", "plain"])
def test_imported_text_loads_back_verbatim(tmp_path: Path, text: str) -> None:
    import yaml

    from vmform.importer import literal_text

    written = yaml.safe_dump({"domains": {"vm": {"description": literal_text(text)}}})
    assert load(tmp_path, written).resources["domain.vm"].desired["description"] == text


# --- clear refusals -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "reason"), [
    ('<xsl:template name="r"><xsl:call-template name="r"/></xsl:template>'
     '<xsl:template match="/"><xsl:call-template name="r"/></xsl:template>', "templates nested deeper than"),
    ('<xsl:template match="/"><xsl:message terminate="yes">no thanks</xsl:message></xsl:template>', "no thanks"),
])
def test_a_failing_stylesheet_says_why(tmp_path: Path, body: str, reason: str) -> None:
    sheet = f'<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">{body}</xsl:stylesheet>'
    found = errors(tmp_path, "domains:\n  vm:\n    xslt: '" + sheet + "'\n")
    assert len(found) == 1 and "the XSLT stylesheet failed: " in found[0] and reason in found[0], found
    assert "unknown error" not in found[0]


def test_a_widening_of_the_pool_roots_is_shown_in_bold_in_every_plan() -> None:
    from vmform.plan import Plan
    from vmform.planview import allowed_lines, plan_markdown

    plan = Plan("p", "qemu:///system", (), allowed={"vmform.toml": ("pool_roots /srv/vms",)})
    assert allowed_lines(plan) == ["[bold]vmform.toml widens the pool roots: /srv/vms[/bold] (pools may be made there "
                                   "without allow: \\[host_paths])"]  # rich markup escapes the bracket
    assert "**vmform.toml widens the pool roots: /srv/vms**" in plan_markdown(plan)


def test_an_import_error_names_the_object_and_the_written_file() -> None:
    from vmform.errors import ManifestError, Position
    from vmform.importer import _named

    text = "# header\ndomains:\n  web:\n    memory: 8MiB\n    xml:\n      devices: {}\n"
    error = ManifestError("memory: too small", Position(".tmp/x/imported.yaml", 4, 13))
    message = str(error).replace(".tmp/x/imported.yaml", "/p/imported.yaml")
    assert _named(message, error, ".tmp/x/imported.yaml", text) == \
        "domain.web: /p/imported.yaml:4:13: memory: too small"
