# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""The digest of what decides a role's work on one machine (its stamp)."""

from __future__ import annotations

DOCUMENTATION = r"""
name: stamp_digest
short_description: The digest of a role's inputs, its own files and the machine's OS
version_added: 0.2.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Gives a sha256 (hex) of a mapping of the role's inputs (variable names to their
    values on this machine), of every file of the given role directories and of the
    collection's plugins beside them (the code the roles run), and of the given OS facts.
  - A string input that names an existing file on the controller (a lock file, a
    certificate, a CA bundle, a notebook) counts by its content, not its name.
  - C(stamp_report) gives, of a list of machines, those where a role did its work this run
    (C(configured)) and those where every role found its stamp matching (C(skipped)), from the
    C(__dask_ec2_stamps_done) fact the roles set.
  - A role that finds its own digest in the stamp it wrote on a machine at the end of
    its last complete run skips its work there (the dask_ec2_stamp module).
positional: _input, role_paths, os
options:
  _input:
    description: The role's inputs, variable names to values.
    type: dict
    required: true
  role_paths:
    description: The role's directory and those of the roles it imports (C(role_path), C(ansible_parent_role_paths)).
    type: list
    elements: path
    required: true
  os:
    description: What of the machine's OS decides the work (distribution, release, architecture).
    type: list
    elements: str
    default: []
"""

EXAMPLES = r"""
- name: Compare this machine's stamp of the role with this run's inputs
  ansible.builtin.set_fact:
    __uv_stamp: >-
      {{ dict(names | zip(q('ansible.builtin.vars', *names)))
         | dask_ec2_ansible.cluster.stamp_digest([role_path], [ansible_facts['distribution']]) }}
  vars:
    names: "{{ q('ansible.builtin.varnames', '^uv_') }}"
"""

RETURN = r"""
_value:
  description: The digest, 64 hex digits.
  type: str
"""

import hashlib
import json
import os

# What in a role directory is not what the role runs.
_SKIPPED_DIRS = {"molecule", "__pycache__", ".pytest_cache"}


def _file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 16), b""):
            digest.update(block)
    return digest.hexdigest()


def _tree_digests(top):
    """(relative path, sha256) of every file under top, sorted."""
    found = []
    for directory, subdirs, files in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                found.append((os.path.relpath(path, top), _file_digest(path)))
    return found


def _by_content(value):
    """The value, with strings that name a controller file replaced by that file's digest."""
    if isinstance(value, dict):
        return {str(key): _by_content(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_by_content(item) for item in value]
    if isinstance(value, str) and value.startswith("/") and os.path.isfile(value):
        return {"file-sha256": _file_digest(value)}
    if isinstance(value, str):
        return str(value)
    return value


def stamp_report(hosts, hostvars):
    """Which of these machines this run configured, which it skipped by their stamps."""
    configured, skipped = [], []
    for host in hosts:
        done = hostvars[host].get("__dask_ec2_stamps_done")
        if not isinstance(done, dict) or not done:
            continue  # not configured by this run (--limit, a failed machine)
        (skipped if all(bool(value) for value in done.values()) else configured).append(host)
    return {"configured": configured, "skipped": skipped}


def stamp_digest(inputs, role_paths, os_facts=None):
    code = {}
    for role_path in role_paths:
        role_path = os.path.realpath(role_path)
        code[os.path.basename(role_path)] = _tree_digests(role_path)
        # roles/<role> in this collection: its plugins are code the role runs too.
        plugins = os.path.join(os.path.dirname(os.path.dirname(role_path)), "plugins")
        if os.path.isdir(plugins):
            code["plugins"] = _tree_digests(plugins)
    document = {
        "inputs": _by_content(dict(inputs)),
        "code": code,
        "os": [str(item) for item in (os_facts or [])],
    }
    text = json.dumps(document, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class FilterModule:
    def filters(self):
        return {"stamp_digest": stamp_digest, "stamp_report": stamp_report}
