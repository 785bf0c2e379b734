"""Manifest loading, table-driven: every file in loader_cases/ is one case, this runner is generic.

Case file syntax (all in YAML comments, so the case stays a plain manifest):

* ``<yaml> # ERROR: <substring>`` -- the loader must report an error on exactly this line whose message
  contains the substring. Repeat the marker on one line for several errors on that line
  (``# ERROR: a # ERROR: b``): the number of errors on the line must match the number of markers.
  No error may be reported on a line without a marker; a case without markers must load cleanly.
* ``# expect-values: <address> <field> <python literal>`` (leading comments, may repeat) -- after a clean
  load, ``manifests.resources[address].desired[field] == literal``.
* ``# expect-resources: <address> ...`` -- after a clean load, exactly these resource addresses exist.
* ``# expect-error-count: <n>`` -- the load reports exactly n errors.

Cases whose file name starts with ``regression_`` pin down library bugs that were found and fixed.
"""

from __future__ import annotations

import ast
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmform.errors import ManifestError, ManifestErrors
from vmform.manifest.loader import load_manifests
from vmform.model import Manifests
from vmform.schema.domain import stable_mac

CASES_DIR = Path(__file__).parent / "loader_cases"
ERROR_MARKER = "# ERROR:"
MAC_RE = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")


@dataclass
class Case:
    path: Path
    errors: dict[int, list[str]] = field(default_factory=dict)  # line -> expected message substrings
    values: list[tuple[str, str, Any]] = field(default_factory=list)
    resources: list[str] | None = None
    error_count: int | None = None


def parse_case(path: Path) -> Case:
    case = Case(path)
    header = True
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        stripped = line.strip()
        if header and stripped.startswith("#"):
            directive, _, rest = stripped.lstrip("# ").partition(":")
            rest = rest.strip()
            if directive == "expect-values":
                address, name, literal = rest.split(maxsplit=2)
                case.values.append((address, name, ast.literal_eval(literal)))
                continue
            if directive == "expect-resources":
                case.resources = rest.split()
                continue
            if directive == "expect-error-count":
                case.error_count = int(rest)
                continue
        elif stripped:
            header = False
        if ERROR_MARKER in line:
            substrings = [part.strip() for part in line.split(ERROR_MARKER)[1:]]
            assert all(substrings), f"{path.name}:{number}: empty ERROR marker"
            case.errors[number] = substrings
    assert not (case.errors and (case.values or case.resources is not None)), (
        f"{path.name}: expect-values/expect-resources only make sense for a case that loads cleanly"
    )
    return case


CASE_FILES = sorted(CASES_DIR.glob("*.yaml"))


def load_case(path: Path) -> Manifests:
    return load_manifests("cases", [path], root=CASES_DIR)


def describe(errors: list[ManifestError]) -> str:
    return "\n".join(f"  line {e.position.line if e.position else '?'}: {e.message}" for e in errors)


def check_errors(case: Case, errors: list[ManifestError]) -> None:
    by_line: dict[int, list[ManifestError]] = {}
    for error in errors:
        assert error.position is not None, f"error without a position: {error.message}"
        assert Path(error.position.file).name == case.path.name, f"error placed in another file: {error}"
        assert error.position.line >= 1 and error.position.column >= 1, f"bad position: {error}"
        by_line.setdefault(error.position.line, []).append(error)
    unexpected = {line: found for line, found in by_line.items() if line not in case.errors}
    assert not unexpected, "errors on lines without an ERROR marker:\n" + describe(
        [e for found in unexpected.values() for e in found]
    )
    for line, substrings in case.errors.items():
        found = list(by_line.get(line, []))
        assert len(found) == len(substrings), (
            f"line {line}: expected {len(substrings)} error(s) matching {substrings}, got:\n{describe(found)}"
        )
        for substring in substrings:
            match = next((e for e in found if substring in e.message), None)
            assert match is not None, (
                f"line {line}: no error containing {substring!r} among:\n{describe(found)}"
            )
            found.remove(match)
    if case.error_count is not None:
        assert len(errors) == case.error_count, (
            f"expected {case.error_count} errors, got:\n{describe(errors)}"
        )


def test_cases_are_collected() -> None:
    # A moved directory or broken glob must not silently turn the table into zero tests.
    assert len(CASE_FILES) >= 40
    assert any(parse_case(path).errors for path in CASE_FILES)
    assert any(parse_case(path).values for path in CASE_FILES)


@pytest.mark.parametrize("path", CASE_FILES, ids=[path.stem for path in CASE_FILES])
def test_loader_case(path: Path) -> None:
    case = parse_case(path)
    if case.errors or case.error_count:
        with pytest.raises(ManifestErrors) as info:
            load_case(path)
        assert info.value.errors, "ManifestErrors raised with an empty error list"
        check_errors(case, info.value.errors)
        return
    try:
        manifests = load_case(path)
    except ManifestErrors as exc:
        pytest.fail(f"{path.name} should load cleanly, got:\n{describe(exc.errors)}")
    if case.resources is not None:
        assert sorted(manifests.resources) == sorted(case.resources)
    for address, name, expected in case.values:
        assert address in manifests.resources, f"no resource {address}; have {sorted(manifests.resources)}"
        desired = manifests.resources[address].desired
        assert name in desired, f"{address} has no bound field {name!r}; has {sorted(desired)}"
        assert desired[name] == expected, f"{address}.{name}: {desired[name]!r} != {expected!r}"


# --- the runner itself: it must be able to fail -------------------------------------------------------


def test_runner_parses_markers(tmp_path: Path) -> None:
    path = tmp_path / "case.yaml"
    path.write_text(
        "# expect-error-count: 3\n"
        "domains:\n"
        "  web:\n"
        "    vcpus: x  # ERROR: whole number\n"
        "    memory: y # ERROR: not a size # ERROR: other\n"
    )
    case = parse_case(path)
    assert case.errors == {4: ["whole number"], 5: ["not a size", "other"]}
    assert case.error_count == 3


def test_runner_rejects_wrong_line_wrong_text_and_extra_errors(tmp_path: Path) -> None:
    path = tmp_path / "case.yaml"
    path.write_text("a: 1  # ERROR: boom\nb: 2\n")
    case = parse_case(path)

    def error(line: int, message: str) -> ManifestError:
        from vmform.errors import Position

        return ManifestError(message, Position(str(path), line, 1))

    check_errors(case, [error(1, "a boom here")])
    with pytest.raises(AssertionError, match="without an ERROR marker"):
        check_errors(case, [error(1, "boom"), error(2, "boom")])
    with pytest.raises(AssertionError, match="no error containing"):
        check_errors(case, [error(1, "bang")])
    with pytest.raises(AssertionError, match="expected 1 error"):
        check_errors(case, [])
    with pytest.raises(AssertionError, match="expected 1 error"):
        check_errors(case, [error(1, "boom"), error(1, "boom again")])


# --- cases that need bytes, several files or exact control of the file ---------------------------------

EXAMPLE = """\
networks:
  lan:
    mode: isolated
    bridge: vmfbr0
    ipv4: 10.40.0.1/24
    dhcp: {start: 10.40.0.100, end: 10.40.0.200}
pools:
  lab: {type: dir, path: /var/lib/vmform/lab}
volumes:
  web-root: {pool: lab, size: 10GiB}
domains:
  web:
    description: web frontend
    type: qemu
    vcpus: 2
    memory: 2GiB
    disks: [{volume: web-root}]
    interfaces: [{network: lan, mac: "52:54:00:aa:00:01"}]
    state: running
    autostart: true
"""


def test_example_loads(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files({"example.yaml": EXAMPLE})
    assert list(manifests.resources) == ["network.lan", "pool.lab", "volume.web-root", "domain.web"]
    web = manifests.resources["domain.web"].desired
    assert web["vcpus"] == 2 and web["max_vcpus"] == 2
    assert web["memory"] == 2 * 1024**3 and web["max_memory"] == 2 * 1024**3
    assert web["disks"] == [
        {
            "pool": "lab",
            "volume": "web-root",
            "format": "qcow2",
            "target": "vda",
            "bus": "virtio",
            "readonly": False,
            "shareable": False,
        }
    ]
    assert web["interfaces"] == [{"mac": "52:54:00:aa:00:01", "network": "lan", "model": "virtio"}]
    assert manifests.resources["volume.web-root"].desired["size"] == 10 * 1024**3


def test_empty_file_loads_with_no_resources(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files({"empty.yaml": ""})
    assert manifests.resources == {}
    assert len(manifests.files) == 1 and manifests.files[0].endswith("empty.yaml")


def test_empty_file_next_to_a_real_one(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files({"a.yaml": "", "b.yaml": "pools:\n  lab: {path: /var/lib/vmform/lab}\n"})
    assert list(manifests.resources) == ["pool.lab"]


def test_non_utf8_bytes(load_errors: Callable[..., ManifestErrors]) -> None:
    errors = load_errors({"latin1.yaml": b"pools:\n  lab: {path: /var/lib/vmform/caf\xe9}\n"}).errors
    assert len(errors) == 1
    assert "not valid UTF-8" in errors[0].message
    assert errors[0].position is not None and errors[0].position.file.endswith("latin1.yaml")


def test_non_utf8_file_does_not_hide_errors_of_other_files(
    load_errors: Callable[..., ManifestErrors],
) -> None:
    errors = load_errors(
        {
            "bad.yaml": b"\xff\xfe\x00garbage",
            "good.yaml": "domains:\n  web: {vcpus: lots}\n",
        }
    ).errors
    assert sorted((Path(e.position.file).name, e.position.line) for e in errors if e.position) == [
        ("bad.yaml", 1),
        ("good.yaml", 2),
    ]


def test_utf8_bom_is_accepted(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files({"bom.yaml": b"\xef\xbb\xbfpools:\n  lab: {path: /var/lib/vmform/lab}\n"})
    assert list(manifests.resources) == ["pool.lab"]


def test_unclosed_bracket_at_end_of_file(load_errors: Callable[..., ManifestErrors]) -> None:
    errors = load_errors({"open.yaml": "domains:\n  web:\n    boot: [hd, cdrom\n"}).errors
    assert len(errors) == 1
    assert "YAML syntax error" in errors[0].message and "']'" in errors[0].message
    assert errors[0].position is not None and errors[0].position.line >= 3


def test_alias_bomb_fails_cleanly_and_fast(load_errors: Callable[..., ManifestErrors]) -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    started = time.monotonic()
    errors = load_errors({"bomb.yaml": "\n".join(lines) + "\n"}).errors
    assert time.monotonic() - started < 10
    assert len(errors) == 1
    assert "alias bomb" in errors[0].message


def test_duplicate_resource_across_files(load_errors: Callable[..., ManifestErrors]) -> None:
    errors = load_errors(
        {
            "a.yaml": "pools:\n  lab: {path: /var/lib/vmform/a}\n",
            "b.yaml": "pools:\n  other: {path: /var/lib/vmform/o}\n  lab: {path: /var/lib/vmform/b}\n",
        }
    ).errors
    assert len(errors) == 1
    error = errors[0]
    assert error.position is not None
    assert (Path(error.position.file).name, error.position.line) == ("b.yaml", 3)
    assert "pool.lab is declared twice" in error.message
    assert "a.yaml:2" in error.message


def test_references_across_files(load_files: Callable[..., Manifests]) -> None:
    manifests = load_files(
        {
            "storage.yaml": "pools:\n  lab: {path: /var/lib/vmform/lab, name: vmf-lab}\nvolumes:\n  root: {pool: lab, size: 1GiB}\n",
            "vms.yaml": "domains:\n  web: {disks: [root]}\n",
        }
    )
    assert manifests.resources["domain.web"].desired["disks"][0]["pool"] == "vmf-lab"


def test_errors_from_several_files_are_reported_together(load_errors: Callable[..., ManifestErrors]) -> None:
    exc = load_errors(
        {
            "a.yaml": "domains:\n  web: {memroy: 1GiB}\n",
            "b.yaml": "pools:\n  lab: {}\n",
            "c.yaml": "networks: [oops\n",
        }
    )
    assert sorted((Path(e.position.file).name, e.position.line) for e in exc.errors if e.position) == [
        ("a.yaml", 2),
        ("b.yaml", 2),
        ("c.yaml", 2),
    ]
    text = str(exc)
    assert "did you mean 'memory'" in text and "'path' is required" in text and "YAML syntax error" in text


def test_error_string_has_file_line_column(load_errors: Callable[..., ManifestErrors]) -> None:
    exc = load_errors({"x.yaml": "domains:\n  web:\n    vcpus: many\n"})
    assert len(exc.errors) == 1
    assert re.search(r"x\.yaml:3:12: expected a whole number", str(exc))
    assert str(exc.errors[0]).endswith("x.yaml:3:12: expected a whole number, got a string")


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ManifestErrors) as info:
        load_manifests("p", [tmp_path / "nope.yaml"], root=tmp_path)
    assert len(info.value.errors) == 1
    assert "cannot read manifest" in info.value.errors[0].message


# --- bound values that case files cannot state literally ------------------------------------------------

TWO_NICS = """\
networks:
  lan: {}
domains:
  web:
    interfaces: [lan, {bridge: br0}]
"""


def test_default_mac_is_stable_and_in_qemu_range(load_files: Callable[..., Manifests]) -> None:
    first = load_files({"m.yaml": TWO_NICS}).resources["domain.web"].desired["interfaces"]
    second = load_files({"m.yaml": TWO_NICS}).resources["domain.web"].desired["interfaces"]
    macs = [nic["mac"] for nic in first]
    assert all(MAC_RE.fullmatch(mac) for mac in macs), macs
    assert macs == [nic["mac"] for nic in second]
    assert macs[0] != macs[1]
    assert first[0]["network"] == "lan" and first[1]["bridge"] == "br0"


def test_default_mac_depends_on_project_and_address(load_files: Callable[..., Manifests]) -> None:
    one = (
        load_files({"m.yaml": TWO_NICS}, project="one")
        .resources["domain.web"]
        .desired["interfaces"][0]["mac"]
    )
    two = (
        load_files({"m.yaml": TWO_NICS}, project="two")
        .resources["domain.web"]
        .desired["interfaces"][0]["mac"]
    )
    assert one != two
    assert one == stable_mac("one", "domain.web", 0)
    assert stable_mac("one", "domain.web", 0) != stable_mac("one", "domain.db", 0)


def test_default_mac_does_not_move_when_a_mac_is_added_elsewhere(
    load_files: Callable[..., Manifests],
) -> None:
    before = load_files({"m.yaml": TWO_NICS}).resources["domain.web"].desired["interfaces"][1]["mac"]
    pinned = TWO_NICS.replace("[lan,", '[{network: lan, mac: "52:54:00:00:00:02"},')
    after = load_files({"m.yaml": pinned}).resources["domain.web"].desired["interfaces"]
    assert after[0]["mac"] == "52:54:00:00:00:02"
    assert after[1]["mac"] == before


# --- library bugs found while writing these tests (expected to fail until fixed) -------------------------


def test_regression_default_lists_are_shared_between_resources(load_files: Callable[..., Manifests]) -> None:
    """LIBRARY BUG: FieldSpec defaults are shared mutable objects (boot default=["hd"], disks/interfaces
    default=[]): parse_fields puts the same list into every resource, and domain.bind hands the very same
    boot list out as desired["boot"]. Mutating one domain's desired value changes every other domain's,
    in this load and in every later load of the process."""
    first = load_files({"m.yaml": TWO_NICS + "  db: {}\n"})
    web, db = (first.resources[a].desired for a in ("domain.web", "domain.db"))
    web["boot"].append("cdrom")
    try:
        assert db["boot"] == ["hd"]
        second = load_files({"m.yaml": TWO_NICS})
        assert second.resources["domain.web"].desired["boot"] == ["hd"]
    finally:
        web["boot"].remove("cdrom")  # do not poison the other tests while the bug exists


def test_regression_control_character_is_a_manifest_error(load_errors: Callable[..., ManifestErrors]) -> None:
    """LIBRARY BUG: a non-printable character makes yaml.SafeLoader(text) raise ReaderError in
    load_yaml *before* its try block, so the raw yaml.reader.ReaderError escapes load_manifests."""
    errors = load_errors({"ctl.yaml": b'pools:\n  lab: {path: "/var/lib/vmform/\x01"}\n'}).errors
    assert len(errors) == 1
    assert errors[0].position is not None and errors[0].position.file.endswith("ctl.yaml")


def test_regression_positions_are_relative_to_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LIBRARY BUG: _display_path ignores `root` (both branches are relative to the cwd)."""
    project = tmp_path / "project"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = project / "vms" / "web.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("domains:\n  web: {vcpus: x}\n")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ManifestErrors) as info:
        load_manifests("p", [path], root=project)
    assert info.value.errors[0].position is not None
    assert info.value.errors[0].position.file == str(Path("vms") / "web.yaml")


def test_regression_more_than_26_disks_without_targets(load_files: Callable[..., Manifests]) -> None:
    """LIBRARY BUG: domain.bind picks default targets with next() over vda..vdz only; the 27th disk
    raises StopIteration out of load_manifests (the target pattern itself allows vdaa)."""
    volumes = "".join(f"  v{n}: {{pool: lab, size: 1GiB}}\n" for n in range(27))
    disks = ", ".join(f"v{n}" for n in range(27))
    text = f"pools:\n  lab: {{path: /var/lib/vmform/lab}}\nvolumes:\n{volumes}domains:\n  big:\n    disks: [{disks}]\n"
    try:
        manifests = load_files({"big.yaml": text})
    except ManifestErrors as exc:  # refusing cleanly is acceptable too
        assert len(exc.errors) == 1 and exc.errors[0].position is not None
        return
    targets = [disk["target"] for disk in manifests.resources["domain.big"].desired["disks"]]
    assert len(set(targets)) == 27


def test_regression_unquoted_mac_error_shows_what_was_written(load_errors: Callable[..., ManifestErrors]) -> None:
    """LIBRARY BUG (message): YAML 1.1 reads an unquoted all-digit MAC as a base-60 integer, and the error
    quotes that integer ('41135085296'), which the user never wrote."""
    errors = load_errors(
        {
            "mac.yaml": "networks:\n  lan: {}\ndomains:\n  web:\n"
            "    interfaces: [{network: lan, mac: 52:54:00:12:34:56}]\n"
        }
    ).errors
    assert len(errors) == 1
    assert errors[0].position is not None and errors[0].position.line == 5
    assert "41135085296" not in errors[0].message
