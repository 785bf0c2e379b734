#!/usr/bin/python
# Copyright: (c) 2026, vmform developers

"""The vmform Ansible module: a thin client of the vmform library API (vmform.api), as the CLI is.
Python 3.11 or later, as vmform (tests/config.yml), so no Python 2 boilerplate."""

DOCUMENTATION = r"""
---
module: vmform
short_description: Bring a vmform project to its desired state on a libvirt host
version_added: 0.1.0
description:
  - Loads a vmform project (a directory with C(vmform.toml) and YAML manifests of libvirt domains, networks,
    storage pools and volumes), compares it with what the libvirt host has, and applies the plan
    (O(state=present)), destroys every object the project owns (O(state=absent)), or only plans (O(state=planned)).
  - It calls the vmform library in-process, exactly as the C(vmform) command does; it applies without asking,
    like C(vmform apply --auto-approve).
  - Reports C(changed) only when the host was changed (in check mode, when it would be).
  - With C(--diff), shows the field-level before and after of every change; sensitive values (cloud-init
    user-data) stay masked.
author:
  - vmform developers (@vmform)
requirements:
  - vmform (this repository) and libvirt-python, importable by the Python interpreter the module runs with
    (set C(ansible_python_interpreter) to the virtualenv vmform is installed in).
extends_documentation_fragment:
  - ansible.builtin.action_common_attributes
attributes:
  check_mode:
    support: full
    details: Plans only and reports C(changed) as the apply would; nothing on the host is touched.
  diff_mode:
    support: full
  platform:
    platforms: posix
options:
  project_src:
    description:
      - Path of the vmform project; C(vmform.toml) is looked for there and in its parents.
    type: path
    required: true
  state:
    description:
      - V(present) applies the plan, so that the host matches the manifests.
      - V(absent) destroys every object this project owns on the host (only the O(targets) and what uses them,
        when given).
      - V(planned) only plans and never changes the host, so C(changed) is always false; the plan is in
        RV(changes), RV(summary) and RV(plan).
    type: str
    choices: [present, absent, planned]
    default: present
  targets:
    description:
      - Limit the plan to these resource addresses (C(kind.name), for example C(domain.web)) and what they
        depend on, as C(vmform plan --target). With O(state=absent), the targets and what uses them.
    type: list
    elements: str
    default: []
  variables:
    description:
      - Values for the project's declared variables, by name (as C(-var NAME=VALUE) on the command line, with
        their YAML types). Setting an undeclared variable, or a value of the wrong type, fails the task.
    type: dict
    default: {}
  parallelism:
    description:
      - How many independent changes run at once, from 1 to 64. Defaults to C(parallelism) in C(vmform.toml).
    type: int
  uri:
    description:
      - The libvirt URI to manage (for example C(qemu:///system) or C(qemu+ssh://root@host/system)); overrides
        C(uri) in C(vmform.toml).
    type: str
  lock_timeout:
    description:
      - Seconds (0 or more) to wait for the project lock held by another apply or destroy, then fail naming its
        holder.
    type: float
    default: 0
  restart:
    description:
      - Allow restart-class changes to restart the domains and networks they concern (clean shutdown first),
        as C(vmform apply --restart). Without it, such changes are written to the definition and take effect
        at the next restart.
    type: bool
    default: false
  show_sensitive:
    description:
      - Return sensitive outputs (those marked C(sensitive) in the project's outputs) in clear in
        RV(project_outputs). Without it they are C((sensitive)), as C(vmform output) lists them, so C(-v) never
        prints a secret. With it, also set C(no_log) on the task, or Ansible prints them.
    type: bool
    default: false
notes:
  - The module runs on the host whose Python has vmform installed; with O(uri) or the project's C(uri) it can
    manage a remote libvirt host from there.
  - Apply and destroy take the project's lock on the libvirt host, as the C(vmform) command does.
seealso:
  - name: vmform README
    description: The vmform command, manifests and plans.
    link: https://github.com/vmform/vmform
"""

EXAMPLES = r"""
- name: Bring the lab to its desired state
  vmform.libvirt.vmform:
    project_src: /srv/vmform/lab
  register: lab

- name: Show each domain's addresses
  ansible.builtin.debug:
    msg: "{{ item.name }}: {{ item.addresses | map(attribute='ip') | join(', ') }}"
  loop: "{{ lab.outputs }}"

- name: Only the web domain and what it needs, on another host, allowing restarts
  vmform.libvirt.vmform:
    project_src: /srv/vmform/lab
    targets: [domain.web]
    uri: qemu+ssh://root@kvm1.example.com/system
    restart: true
    lock_timeout: 60

- name: Drift check (changes nothing; run with --check --diff to see the fields)
  vmform.libvirt.vmform:
    project_src: /srv/vmform/lab
    state: planned
  register: drift
  failed_when: drift.changes | length > 0

- name: Remove everything the project owns
  vmform.libvirt.vmform:
    project_src: /srv/vmform/lab
    state: absent
"""

RETURN = r"""
summary:
  description: The plan's counts, as the last line of C(vmform plan). C(add) counts creates and replaces,
    C(change) updates, C(destroy) deletes and replaces.
  returned: success
  type: dict
  sample: {"add": 4, "change": 0, "destroy": 0}
changes:
  description: Every change of the plan, in apply order.
  returned: success
  type: list
  elements: dict
  contains:
    address:
      description: The resource address, C(kind.name) as in the manifests.
      type: str
      sample: domain.web
    action:
      description: One of C(create), C(update), C(delete_then_create), C(create_then_delete), C(delete).
      type: str
      sample: update
    symbol:
      description: The action's symbol in C(vmform plan) (C(+), C(~), C(-/+), C(+/-), C(-)).
      type: str
      sample: "~"
    fields:
      description: The paths of the fields an update or replace changes.
      type: list
      elements: str
      sample: ["memory", "autostart"]
    reason:
      description: Why a replace is needed (empty otherwise).
      type: str
      sample: source cannot change in place
  sample: [{"address": "domain.web", "action": "update", "symbol": "~", "fields": ["autostart"], "reason": ""}]
plan:
  description: The whole plan as C(vmform plan --json) prints it (docs/JSON.md), sensitive values masked.
  returned: success
  type: dict
  sample: {"format_version": 1, "project": "lab", "host_uri": "qemu:///system", "summary": {}, "changes": [],
           "notes": []}
notes:
  description: What to know that is not a change, for example values waiting for a restart.
  returned: success
  type: list
  elements: str
  sample: []
project_outputs:
  description: The project's C(outputs:), evaluated against the host after the task's changes, as
    C(vmform output --json) prints them; sensitive ones are C((sensitive)) unless O(show_sensitive=true).
  returned: success, unless O(state=absent)
  type: dict
  sample: {"web_ip": "10.232.0.100"}
outputs:
  description: Every declared domain's state and IP addresses (DHCP leases, guest agent), as
    C(vmform output --json) prints them, read after the task's changes.
  returned: success
  type: list
  elements: dict
  contains:
    address:
      description: The domain's address.
      type: str
      sample: domain.web
    name:
      description: The libvirt name.
      type: str
      sample: web
    state:
      description: C(running), C(stopped), C(paused), C(absent) (declared but not on the host), ...
      type: str
      sample: running
    addresses:
      description: Each address with its interface, MAC address, prefix length and source (C(lease) or C(agent)).
      type: list
      elements: dict
      sample: [{"interface": "vnet0", "mac": "52:54:00:47:00:01", "ip": "10.232.0.100", "prefix": 24,
                "source": "lease"}]
  sample: [{"address": "domain.web", "name": "web", "state": "running", "addresses": []}]
apply:
  description: What the apply or destroy did, per address (not in check mode, nor when there was nothing to do).
  returned: when changes were applied
  type: dict
  contains:
    done:
      description: Addresses whose change was made.
      type: list
      elements: str
    failed:
      description: Address to the error of its change.
      type: dict
    skipped:
      description: Address to the failure it waited for.
      type: dict
    mismatched:
      description: Address to how the host differs from the plan when read back after the apply.
      type: dict
  sample: {"done": ["network.lab"], "failed": {}, "skipped": {}, "mismatched": {}}
errors:
  description: Every error when the task failed on several (each manifest mistake at its file:line:column);
    C(msg) holds them joined with C(; ).
  returned: failure
  type: list
  elements: str
  sample: ["main.yaml:12:13: memory: '2GB' is not a size; use GiB or MiB (e.g. 2GiB)"]
"""

import signal
import threading
import traceback

from ansible.module_utils.basic import AnsibleModule, missing_required_lib

VMFORM_IMPORT_ERROR = None
try:
    import libvirt
    import yaml

    from vmform import api
    from vmform.connection import libvirt_message
    from vmform.errors import ManifestErrors, PlanErrors, VmformError
except ImportError:
    VMFORM_IMPORT_ERROR = traceback.format_exc()

ARGUMENT_SPEC = dict(
    project_src=dict(type="path", required=True),
    state=dict(type="str", choices=["present", "absent", "planned"], default="present"),
    targets=dict(type="list", elements="str", default=[]),
    variables=dict(type="dict", default={}),
    parallelism=dict(type="int"),
    uri=dict(type="str"),
    lock_timeout=dict(type="float", default=0),
    restart=dict(type="bool", default=False),
    show_sensitive=dict(type="bool", default=False),
)


class Interrupted(Exception):
    """SIGTERM (Ansible's timeout, a cancelled job): unwind so that the project lock is released."""


def _stop_on_sigterm(stop):
    def interrupt(_signum, _frame):
        stop.set()
        raise Interrupted()

    signal.signal(signal.SIGTERM, interrupt)


def _check_ranges(params):
    """The ranges the vmform command's options have."""
    if params["parallelism"] is not None and not 1 <= params["parallelism"] <= 64:
        raise VmformError(f"parallelism must be between 1 and 64, not {params['parallelism']}")
    if params["lock_timeout"] < 0:
        raise VmformError(f"lock_timeout must be 0 or more seconds, not {params['lock_timeout']}")


def _load_workspace(params):
    from vmform.manifest.variables import VariableInputs

    return api.load_workspace(params["project_src"], VariableInputs(values=params["variables"] or {}))


def _change_summary(change):
    return dict(
        address=change["address"],
        action=change["action"],
        symbol=change["symbol"],
        fields=[field["path"] for field in change["fields"]],
        reason=change["reason"],
    )


def _yaml(values):
    if not values:
        return ""
    return yaml.safe_dump(values, sort_keys=False, default_flow_style=False, allow_unicode=True)


def _shown(values):
    return dict((key, value) for key, value in (values or {}).items() if value not in (None, [], {}, ""))


def _diff(change):
    """One change in Ansible's diff format: the whole object (YAML) for a create or delete; for an update or
    replace, one ``field: value`` line per changed field, with the values as vmform plan shows them."""
    if change["action"] in ("create", "delete"):
        before, after = _yaml(_shown(change["before"])), _yaml(_shown(change["after"]))
    else:
        before = "".join(f"{f['path']}: {f['display_before']}\n" for f in change["fields"] if f["before"] is not None)
        after = "".join(f"{f['path']}: {f['display_after']}\n" for f in change["fields"] if f["after"] is not None)
    planned = change["action"] + (f" ({change['reason']})" if change["reason"] else "")
    return dict(
        before_header=f"{change['address']} (on the host)",
        after_header=f"{change['address']} ({planned})",
        before=before,
        after=after,
    )


def _incomplete(command, applied):
    verb = "Destroy" if command == "destroy" else "Apply"
    problems = [f"{address}: {message}" for address, message in applied.failed.items()]
    problems += [f"{address}: read back after apply, it differs from the plan: {message}"
                 for address, message in applied.mismatched.items()]
    problems += [f"{address}: interrupted: {message}" for address, message in applied.interrupted.items()]
    if applied.lost_connection:
        problems.append(applied.lost_connection)
    return (f"{verb} incomplete: {len(applied.done)} done, {len(applied.failed)} failed, "
            f"{len(applied.interrupted)} interrupted, {len(applied.skipped)} skipped: {'; '.join(problems)}")


def run(module):
    params = module.params
    state = params["state"]
    _check_ranges(params)
    workspace = _load_workspace(params)
    connections = api.connect(workspace, params["uri"])
    try:
        if state == "planned" or module.check_mode:
            result = _plan_and_apply(module, workspace, connections, apply=False)
        else:
            # The lock first, then read the host and plan, then apply under the same lock: a run that waited
            # for another one plans what that one left.
            stop = threading.Event()
            _stop_on_sigterm(stop)
            command = "destroy" if state == "absent" else "apply"
            with api.locked(workspace, connections, command, params["lock_timeout"], stop=stop) as held:
                result = _plan_and_apply(module, workspace, connections, apply=True, stop=stop)
            result["notes"] += held.left_behind
        result["outputs"] = [output.to_json() for output in api.domain_outputs(workspace, connections)]
        if params["state"] != "absent":
            result["project_outputs"] = api.project_outputs(workspace, connections, params["show_sensitive"])
        return result
    finally:
        connections.close()


def _plan_and_apply(module, workspace, connections, apply, stop=None):
    params = module.params
    state = params["state"]
    targets = params["targets"] or []
    if state == "absent":
        the_plan = api.destroy_plan(workspace, connections, targets)
    else:
        the_plan = api.plan(workspace, connections, targets, restart=params["restart"])
    plan_json = the_plan.to_json()
    result = dict(
        changed=False,
        summary=the_plan.counts(),
        changes=[_change_summary(change) for change in plan_json["changes"]],
        plan=plan_json,
        notes=list(the_plan.notes),
    )
    if module._diff:
        result["diff"] = [_diff(change) for change in plan_json["changes"]]
    if state != "planned" and not the_plan.empty:
        if not apply:
            result["changed"] = True  # check mode
        else:
            command = "destroy" if state == "absent" else "apply"
            applied = api.apply_plan(workspace, connections, the_plan, params["parallelism"], None,
                                     params["lock_timeout"], command, stop)
            result["changed"] = bool(applied.done)
            result["apply"] = dict(done=applied.done, failed=applied.failed, skipped=applied.skipped,
                                   mismatched=applied.mismatched, interrupted=applied.interrupted)
            if not applied.ok:
                module.fail_json(msg=_incomplete(command, applied), **result)
    return result


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    if VMFORM_IMPORT_ERROR is not None:
        module.fail_json(msg=missing_required_lib("vmform"), exception=VMFORM_IMPORT_ERROR)
    try:
        result = run(module)
    except (ManifestErrors, PlanErrors) as exc:
        errors = [str(error) for error in exc.errors]
        module.fail_json(msg="; ".join(errors), errors=errors)
    except VmformError as exc:
        errors = str(exc).splitlines()
        module.fail_json(msg="; ".join(errors), errors=errors)
    except libvirt.libvirtError as exc:
        module.fail_json(msg=libvirt_message(exc))
    except Interrupted:
        module.fail_json(msg="interrupted (SIGTERM): no further changes were started")
    module.exit_json(**result)


if __name__ == "__main__":
    main()
