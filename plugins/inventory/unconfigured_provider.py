# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Quiet stand-in for the inventory of a provider this machine is not set up for."""

from __future__ import annotations

DOCUMENTATION = r"""
name: unconfigured_provider
short_description: No hosts, quietly, from the inventory of a provider that is not set up here
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - The project ships one inventory source per provider (C(inventory/docker.yml),
    C(inventory/aws_ec2.yml)) and Ansible reads all of them on every run. A provider's
    own plugin fails when its backend is missing (no Docker engine, no AWS credentials),
    which Ansible turns into two warnings on every run of every user.
  - This plugin claims such a source only when its backend is clearly not set up on this
    machine, and answers with no hosts (a message at -v). Otherwise it declines, and the
    provider's own plugin reads the source and reports real problems as usual.
  - Not set up means, for C(amazon.aws.aws_ec2), that boto3 finds no credentials (environment,
    AWS_PROFILE, ~/.aws, SSO, container or instance role); for
    C(community.docker.docker_containers), that DOCKER_HOST is unset and /var/run/docker.sock
    does not exist.
  - List it before the providers' plugins in C(enable_plugins).
options:
  plugin:
    description: The provider plugin named in the source (any value; this plugin reads it).
    required: true
"""

EXAMPLES = r"""
# ansible.cfg: this plugin first, then the providers' own
# [inventory]
# enable_plugins = dask_ec2_ansible.cluster.unconfigured_provider, community.docker.docker_containers, amazon.aws.aws_ec2

# inventory/aws_ec2.yml is read by amazon.aws.aws_ec2 where AWS credentials are
# set up, and by this plugin (no hosts, no warning) where they are not.
plugin: amazon.aws.aws_ec2
regions:
  - eu-west-1
"""

import os

import yaml

from ansible.plugins.inventory import BaseInventoryPlugin
from ansible.utils.display import Display

display = Display()

AWS_PLUGIN = "amazon.aws.aws_ec2"
DOCKER_PLUGIN = "community.docker.docker_containers"


def aws_credentials_missing() -> bool:
    try:
        import botocore.session
    except ImportError:
        return True  # amazon.aws cannot work either; preflight says so for provider=aws
    try:
        session = botocore.session.Session(profile=os.environ.get("AWS_PROFILE") or None)
        return session.get_credentials() is None
    except Exception:  # an unknown profile, an unreadable ~/.aws/config
        return True


def docker_engine_missing() -> bool:
    host = os.environ.get("DOCKER_HOST", "")
    if not host:
        return not os.path.exists("/var/run/docker.sock")
    if host.startswith("unix://"):
        return not os.path.exists(host[len("unix://"):])
    return False  # a remote engine: let the docker plugin talk to it


class InventoryModule(BaseInventoryPlugin):
    NAME = "unconfigured_provider"

    def _provider_plugin(self, path: str) -> str:
        if not path.endswith((".yml", ".yaml")) or not os.path.isfile(path):
            return ""
        try:
            with open(path, encoding="utf-8") as source:
                data = yaml.safe_load(source)
        except (OSError, yaml.YAMLError):
            return ""
        return str(data.get("plugin", "")) if isinstance(data, dict) else ""

    def verify_file(self, path):
        plugin = self._provider_plugin(path)
        if plugin == AWS_PLUGIN:
            self._reason = "no AWS credentials are configured on this machine"
            return aws_credentials_missing()
        if plugin == DOCKER_PLUGIN:
            self._reason = "no Docker engine is set up on this machine (no DOCKER_HOST, no /var/run/docker.sock)"
            return docker_engine_missing()
        return False

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache=cache)
        display.v(f"{path}: {self._reason}; this provider's inventory is empty.")
