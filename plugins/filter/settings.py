# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Find settings that look like misspellings of this project's settings."""

from __future__ import annotations

DOCUMENTATION = r"""
name: misspelled_settings
short_description: Names that look like typos of the project's settings
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Ansible silently ignores a variable nobody reads, so C(-e worker_cuont=3)
    would build a cluster with the default worker count. This filter takes the
    names of all variables of a play and returns a message for each name that
    is no variable of this project but is close to one of its settings.
  - Known names are the settings (the options of the C(validate) entry point in
    C(roles/cluster/meta/argument_specs.yml)), the variables in C(group_vars/)
    and every role's C(defaults/main.yml).
positional: project_dir
options:
  _input:
    description: Variable names to check.
    type: list
    elements: str
    required: true
  project_dir:
    description: The project's root directory.
    type: path
    required: true
"""

EXAMPLES = r"""
- name: Check for misspelled settings
  ansible.builtin.assert:
    that: __misspelled | length == 0
    fail_msg: "{{ __misspelled | join(' ') }}"
  vars:
    __misspelled: "{{ vars.keys() | list | dask_ec2_ansible.cluster.misspelled_settings(playbook_dir | dirname) }}"
"""

import difflib
from pathlib import Path

import yaml


def _keys(path: Path) -> set[str]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return set()
    return set(data) if isinstance(data, dict) else set()


def misspelled_settings(names, project_dir):
    root = Path(project_dir)
    spec = yaml.safe_load((root / "roles" / "cluster" / "meta" / "argument_specs.yml").read_text())
    settings = set(spec["argument_specs"]["validate"]["options"])
    known = set(settings)
    for path in [*root.glob("group_vars/**/*.yml"), *root.glob("roles/*/defaults/main.yml")]:
        known |= _keys(path)
    messages = []
    for name in sorted(set(names) - known):
        if name.startswith(("ansible_", "_")):
            continue
        close = difflib.get_close_matches(name, sorted(settings), n=1, cutoff=0.8)
        if close:
            messages.append(f"'{name}' is not a setting of this toolkit: did you mean {close[0]}?")
    return messages


class FilterModule:
    def filters(self):
        return {"misspelled_settings": misspelled_settings}
