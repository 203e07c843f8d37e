#!/usr/bin/python
# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Record, or forget, that a role's work is done on this machine."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dask_ec2_stamp
short_description: Write or remove a role's stamp on a machine
version_added: 0.2.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - A stamp is a local fact file, C(<directory>/dask_ec2_ansible_stamp_<name>.fact), holding the
    digest of what decided a role's work (the stamp_digest filter) and facts the role's later
    consumers need. Fact gathering reads it back as C(ansible_local.dask_ec2_ansible_stamp_<name>).
  - A role writes its stamp at the end of a complete run and removes it before it starts work whose
    inputs differ, so that a run that fails half-way never leaves a stamp that matches.
  - Honours check mode (reports what it would do, writes nothing).
options:
  name:
    description: The stamp's name (the role's, or the role's and the service's), letters, digits and underscores.
    type: str
    required: true
  digest:
    description: The digest to record; required with O(state=present).
    type: str
  facts:
    description: Facts to keep with the stamp, for the run that skips the role.
    type: dict
    default: {}
  state:
    description: Write the stamp (present) or remove it (absent).
    type: str
    choices: [present, absent]
    default: present
  directory:
    description: Where local facts live (fact gathering's C(fact_path)).
    type: path
    default: /etc/ansible/facts.d
"""

EXAMPLES = r"""
- name: Record that the uv role is done on this machine
  dask_ec2_ansible.cluster.dask_ec2_stamp:
    name: uv
    digest: "{{ __uv_stamp }}"
"""

RETURN = r"""
path:
  description: The stamp's file.
  type: str
  returned: always
"""

import json
import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            digest=dict(type="str"),
            facts=dict(type="dict", default={}),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            directory=dict(type="path", default="/etc/ansible/facts.d"),
        ),
        required_if=[("state", "present", ["digest"])],
        supports_check_mode=True,
    )
    name = module.params["name"]
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        module.fail_json(msg="a stamp's name is letters, digits and underscores, not %r" % name)
    path = os.path.join(module.params["directory"], "dask_ec2_ansible_stamp_%s.fact" % name)

    try:
        with open(path, encoding="utf-8") as handle:
            current = handle.read()
    except FileNotFoundError:
        current = None

    if module.params["state"] == "absent":
        if current is not None and not module.check_mode:
            os.unlink(path)
        module.exit_json(changed=current is not None, path=path)

    wanted = json.dumps({"digest": module.params["digest"], "facts": module.params["facts"]},
                        sort_keys=True, indent=1) + "\n"
    if current == wanted:
        module.exit_json(changed=False, path=path)
    if not module.check_mode:
        os.makedirs(module.params["directory"], mode=0o755, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=module.params["directory"], prefix=".stamp-")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(wanted)
        # Not executable: fact gathering would run it instead of reading it.
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    module.exit_json(changed=True, path=path)


if __name__ == "__main__":
    main()
