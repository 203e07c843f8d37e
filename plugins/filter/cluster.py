# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Facts about a cluster that several roles and playbooks need, written once."""

from __future__ import annotations

DOCUMENTATION = r"""
name: dask_worker_names
short_description: The names of a cluster's machines
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - C(dask_scheduler_name) gives C(dask-<cluster>-scheduler); C(dask_worker_names)
    gives C(dask-<cluster>-worker-1) .. C(dask-<cluster>-worker-<count>).
  - Both providers name machines (containers, EC2 Name tags) so, and scale-down
    removes the workers whose names are not in the list.
  - C(git_project_name) gives the directory name C(git clone) makes of a URL.
  - C(dask_tls_certificate) gives the certificate request of a machine (its
    host variables) - its name, the address it is reached at, its own, and
    localhost and 127.0.0.1 (what a client reaches it as through an SSH
    tunnel, make tunnel).
  - C(uv_environment) gives the environment uv runs with on a machine.
  - C(local_path) gives the absolute, normalized form of a path on the
    controller (C(~) expanded, relative to the current directory, trailing
    slashes dropped, the last symlink not followed).
  - C(notebook_relpath) gives a path on a machine relative to a directory
    (the notebook directory), normalized; empty when the path is outside it.
  - C(s3_locations) gives, of a list of C(bucket) or C(bucket/prefix) entries
    (an C(s3://) in front is dropped), their C(bucket) and C(prefix) (no
    slashes at its ends; empty for the whole bucket), and C(error) when an
    entry is no bucket name or holds a wildcard.
  - C(s3_access_policy) gives the IAM policy document of s3_read_buckets and
    s3_write_buckets - list each bucket (within its prefixes), get objects of
    the read ones, get, put and delete objects of the write ones - and nothing
    else.
  - C(redact_url) gives a URL without the secret of its user part (C(https://me:secret@host/) gives
    C(https://me:****@host/), C(https://token@host/) gives C(https://****@host/)), for messages and image tags.
  - C(other_owners) gives, of the resources named after a cluster (a mapping of
    C(instance), C(security group), C(key pair) and C(role) to the lists the
    amazon.aws info modules return), those whose C(dask-ec2-ansible:owner) tag
    is set and is not the given ARN, each as C(what) (kind and name) and
    C(owner).
"""

EXAMPLES = r"""
- name: The names of a cluster of 3 workers
  ansible.builtin.debug:
    msg: "{{ 'lab' | dask_ec2_ansible.cluster.dask_scheduler_name }} and {{ 'lab' | dask_ec2_ansible.cluster.dask_worker_names(3) }}"
  # dask-lab-scheduler and ['dask-lab-worker-1', 'dask-lab-worker-2', 'dask-lab-worker-3']

- name: Where a project is cloned
  ansible.builtin.debug:
    msg: "{{ 'https://github.com/me/analysis.git' | git_project_name }}"  # analysis
"""

import os
import posixpath
import re


def dask_scheduler_name(cluster_name):
    return f"dask-{cluster_name}-scheduler"


def dask_worker_names(cluster_name, count):
    return [f"dask-{cluster_name}-worker-{number}" for number in range(1, int(count) + 1)]


def git_project_name(url):
    """What `git clone URL` calls its directory: the last path part, without .git."""
    name = re.sub(r"^.*[/:]", "", str(url).rstrip("/"))
    return re.sub(r"\.git$", "", name)


# What a client on the controller reaches a machine as through an SSH tunnel
# (make tunnel): TLS clients that check the name (a browser on Jupyter, Python's
# ssl with check_hostname) then accept the machine's certificate there too.
TUNNEL_NAMES = ["localhost", "127.0.0.1"]


def dask_tls_certificate(host, suffix=""):
    """A machine's certificate: its name, the address it is reached at, its own address, and localhost.
    With a SUFFIX, a second certificate of the machine (a key of its own) named NAME+SUFFIX, which
    names the machine too."""
    addresses = [host["ansible_host"], host["ansible_facts"]["default_ipv4"]["address"], *TUNNEL_NAMES]
    if suffix:
        addresses.insert(0, host["inventory_hostname"])
    return {"name": host["inventory_hostname"] + suffix, "addresses": list(dict.fromkeys(addresses))}


def uv_environment(cache_dir, ca_bundle, index_url="", compile_bytecode=None):
    """uv on a machine: its cache, the system's CAs, no Python downloads, the index mirror."""
    env = {"UV_CACHE_DIR": cache_dir, "UV_PYTHON_DOWNLOADS": "never", "UV_SYSTEM_CERTS": "1",
           "SSL_CERT_FILE": ca_bundle}
    if compile_bytecode is not None:
        env["UV_COMPILE_BYTECODE"] = "1" if compile_bytecode else "0"
    if index_url:
        env["UV_INDEX_URL"] = index_url
    return env


def local_path(path):
    """An absolute path on the controller, as the user named it (not its symlink's target)."""
    return os.path.abspath(os.path.expanduser(str(path)))


def notebook_relpath(path, root):
    """PATH (relative to ROOT, or absolute) relative to ROOT, normalized: '.' for ROOT itself,
    '' when it is outside ROOT (a '..' too many, another absolute path)."""
    path, root = str(path), posixpath.normpath(str(root))
    full = posixpath.normpath(path if path.startswith("/") else posixpath.join(root, path))
    relative = posixpath.relpath(full, root)
    return "" if relative == ".." or relative.startswith("../") else relative


# S3's rules for a bucket name (3-63 characters; lower case, digits, dots and hyphens).
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def s3_locations(entries):
    """[{'entry', 'bucket', 'prefix', 'error'}] of bucket or bucket/prefix entries."""
    out = []
    for entry in entries or []:
        text = re.sub(r"^s3://", "", str(entry).strip())
        bucket, prefix = (text.split("/", 1) + [""])[:2]
        prefix = prefix.strip("/")
        error = ""
        if not BUCKET_NAME.match(bucket) or ".." in bucket:
            error = f"'{entry}' does not start with a bucket name (3-63 of a-z, 0-9, '.' and '-')"
        elif re.search(r"[*?]", prefix):
            error = f"'{entry}' has a wildcard: give a bucket or bucket/prefix, every object under it is included"
        out.append({"entry": str(entry), "bucket": bucket, "prefix": prefix, "error": error})
    return out


def _objects(location):
    return f"arn:aws:s3:::{location['bucket']}/{location['prefix'] + '/' if location['prefix'] else ''}*"


def s3_access_policy(read, write):
    """The policy of a cluster's own role: exactly the buckets (and prefixes) asked for."""
    read, write = s3_locations(read), s3_locations(write)
    prefixes = {}
    for location in read + write:
        prefixes.setdefault(location["bucket"], set()).add(location["prefix"])
    statements = []
    for number, (bucket, wanted) in enumerate(sorted(prefixes.items()), 1):
        statement = {"Sid": f"List{number}", "Effect": "Allow", "Action": "s3:ListBucket",
                     "Resource": f"arn:aws:s3:::{bucket}"}
        if "" not in wanted:
            # The prefix itself (a "directory" listing) and everything below it.
            statement["Condition"] = {"StringLike": {"s3:prefix": sorted(
                p for prefix in wanted for p in (prefix, prefix + "/*"))}}
        statements.append(statement)
    if read:
        statements.append({"Sid": "Read", "Effect": "Allow", "Action": "s3:GetObject",
                           "Resource": sorted({_objects(location) for location in read})})
    if write:
        statements.append({"Sid": "Write", "Effect": "Allow",
                           "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"],
                           "Resource": sorted({_objects(location) for location in write})})
    return {"Version": "2012-10-17", "Statement": statements}


def redact_url(url):
    """user:password@ keeps the user; a lone token@ (as some private indexes use) is all secret."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:****@", str(url))
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@:]+@", r"\1****@", url)


# How each kind of resource is named in the amazon.aws info modules' answers.
_NAME_KEYS = {"instance": "instance_id", "security group": "group_name", "key pair": "key_name", "role": "role_name"}


def other_owners(found, me):
    others = []
    for kind, resources in found.items():
        for resource in resources or []:
            tags = resource.get("tags") or {}
            owner = tags.get("dask-ec2-ansible:owner", "")
            if owner and owner != me:
                name = tags.get("Name") if kind == "instance" else None
                others.append({"what": f"{kind} {name or resource.get(_NAME_KEYS[kind], '?')}", "owner": owner})
    return others


class FilterModule:
    def filters(self):
        return {
            "dask_scheduler_name": dask_scheduler_name,
            "dask_tls_certificate": dask_tls_certificate,
            "dask_worker_names": dask_worker_names,
            "git_project_name": git_project_name,
            "local_path": local_path,
            "notebook_relpath": notebook_relpath,
            "other_owners": other_owners,
            "redact_url": redact_url,
            "s3_access_policy": s3_access_policy,
            "s3_locations": s3_locations,
            "uv_environment": uv_environment,
        }
