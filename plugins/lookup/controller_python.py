# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""The Python version Ansible itself runs on, on the controller."""

from __future__ import annotations

DOCUMENTATION = r"""
name: controller_python
short_description: The controller's Python version, major.minor
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - The version of the Python that runs ansible-playbook on this machine
    (C(ansible_playbook_python)), as "3.11". A user's Dask Client runs on
    a Python of this machine; the local provider's default os_family is the
    Debian release whose system Python is this one.
  - Read from the running interpreter; no process, no fact gathering.
"""

EXAMPLES = r"""
- name: Show the controller's Python
  ansible.builtin.debug:
    msg: "{{ lookup('dask_ec2_ansible.cluster.controller_python') }}"
"""

RETURN = r"""
_raw:
  description: One string, major.minor, such as "3.11".
  type: list
  elements: str
"""

import sys

from ansible.plugins.lookup import LookupBase


class LookupModule(LookupBase):
    def run(self, terms, variables=None, **kwargs):
        return ["%d.%d" % sys.version_info[:2]]
