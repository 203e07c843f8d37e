# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""What a valid setting looks like, for the early checks and the roles' own."""

from __future__ import annotations

DOCUMENTATION = r"""
name: dask_duration
short_description: Is this a duration such as "30m", "2h", "90s" (or empty)?
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - C(dask_duration) is true for a number with one of the units s, m, h, d, or
    an empty string (for the idle_shutdown setting, empty means never).
  - C(dask_memory_limit) is true for what C(dask worker --memory-limit) takes,
    C(auto), C(0) (no limit), a fraction of the machine's memory such as C(0.8),
    or a size such as C(4GiB) or C(2500MB).
"""

EXAMPLES = r"""
- name: Check the idle time and the memory limit
  ansible.builtin.assert:
    that:
      - idle_shutdown is dask_ec2_ansible.cluster.dask_duration
      - worker_memory_limit is dask_ec2_ansible.cluster.dask_memory_limit
"""

import re


DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(s|m|h|d))?$")
MEMORY_LIMIT = re.compile(r"^(auto|0|0?\.[0-9]+|1(\.0+)?|[0-9]+(\.[0-9]+)?\s*([kKMGTP]i?B|[kKMGTP]|B)?)$")


def dask_duration(value):
    return bool(DURATION.match(str(value)))


def dask_memory_limit(value):
    return bool(MEMORY_LIMIT.match(str(value)))


class TestModule:
    def tests(self):
        return {"dask_duration": dask_duration, "dask_memory_limit": dask_memory_limit}
