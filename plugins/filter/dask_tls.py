# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Which certificates need issuing, and the manifest that records what was issued."""

from __future__ import annotations

DOCUMENTATION = r"""
name: dask_tls_pending
short_description: The certificates a run must (re)issue
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - C(dask_tls_pending) keeps the certificates whose files are missing, whose
    addresses changed since they were issued, whose renewal date has passed,
    or all of them when the CA is new or validity is not in days.
  - C(dask_tls_manifest) gives the manifest after a run, the entries of the
    certificates just issued replacing theirs, renewal 30 days before expiry.
"""

EXAMPLES = r"""
- name: List what to issue
  ansible.builtin.set_fact:
    pending: "{{ certificates | dask_ec2_ansible.cluster.dask_tls_pending(manifest, '/path/tls', ca_is_new, 365, now) }}"
"""

import os


RENEW_DAYS_BEFORE = 30


def dask_tls_pending(certificates, manifest, tls_dir, ca_is_new, valid_days, now):
    pending = []
    for cert in certificates:
        issued = (manifest or {}).get(cert["name"], {})
        if (ca_is_new or int(valid_days) == 0
                or not os.path.isfile(os.path.join(tls_dir, cert["name"] + ".pem"))
                or not os.path.isfile(os.path.join(tls_dir, cert["name"] + ".key"))
                or issued.get("addresses") != sorted(cert.get("addresses") or [])
                or int(issued.get("renew_after", 0)) < int(now)):
            pending.append(cert)
    return pending


def dask_tls_manifest(manifest, issued, valid_days, now, ca_common_name):
    after = dict(manifest or {})
    for cert in issued:
        after[cert["name"]] = {"addresses": sorted(cert.get("addresses") or []),
                               "renew_after": int(now) + (int(valid_days) - RENEW_DAYS_BEFORE) * 86400}
    after["_ca"] = {"common_name": ca_common_name}
    return after


class FilterModule:
    def filters(self):
        return {"dask_tls_pending": dask_tls_pending, "dask_tls_manifest": dask_tls_manifest}
