"""An Ansible inventory of a project's domains, for provisioning them once they are up.

Hosts are the domains' libvirt names; ``ansible_host`` is the first IPv4 address the host reports (DHCP
lease or guest agent), else the address reserved on an interface (``ip:``). Groups come from each
domain's ``groups:`` list. The same data is printed as YAML (an inventory file), INI, or JSON in
Ansible's dynamic-inventory format (``--list`` / ``--host``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from vmform.guests import DomainOutput
from vmform.model import Manifests


@dataclass
class Inventory:
    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> host variables
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> host names

    def to_yaml(self) -> str:
        import yaml

        data: dict[str, Any] = {"all": {"hosts": {name: dict(variables) for name, variables in self.hosts.items()}}}
        if self.groups:
            data["all"]["children"] = {group: {"hosts": {name: None for name in names}}
                                       for group, names in sorted(self.groups.items())}
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)

    def to_ini(self) -> str:
        def line(name: str) -> str:
            return " ".join([name, *(f"{key}={_ini_value(value)}" for key, value in self.hosts[name].items())])

        lines = ["[all]", *(line(name) for name in self.hosts)]
        for group, names in sorted(self.groups.items()):
            lines += ["", f"[{group}]", *names]
        return "\n".join(lines) + "\n"

    def to_dynamic(self) -> str:
        """``--list``: Ansible's dynamic inventory JSON, host variables under _meta."""
        data: dict[str, Any] = {"_meta": {"hostvars": self.hosts},
                                "all": {"hosts": list(self.hosts), "children": sorted(self.groups)}}
        for group, names in self.groups.items():
            data[group] = {"hosts": names}
        return json.dumps(data, indent=2)


def _ini_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(ch in text for ch in " \t\"'#;=") else text


def module_groups(module: tuple[str, ...]) -> list[str]:
    """A domain in module.workers["a"] is in group workers (each module it sits in gives one; Ansible group
    names take no dashes)."""
    return [re.sub(r"[^A-Za-z0-9_]", "_", name.split("[", 1)[0]) for name in module]


def build(manifests: Manifests, outputs: list[DomainOutput]) -> Inventory:
    by_address = {output.address: output for output in outputs}
    inventory = Inventory()
    for resource in manifests.of_kind("domain"):
        output = by_address.get(resource.address)
        name = output.name if output is not None else resource.libvirt_name
        variables: dict[str, Any] = {"vmform_address": resource.address,
                                     "vmform_state": output.state if output is not None else "unknown"}
        live = [a.ip for a in (output.addresses if output is not None else []) if ":" not in a.ip]
        reserved = [nic["ip"] for nic in resource.values.get("interfaces") or []
                    if isinstance(nic, dict) and nic.get("ip")]
        if live or reserved:
            variables["ansible_host"] = (live or reserved)[0]
        inventory.hosts[name] = variables
        for group in [*(resource.values.get("groups") or []), *module_groups(resource.module)]:
            if name not in inventory.groups.setdefault(group, []):
                inventory.groups[group].append(name)
    return inventory
