"""The cluster's Python against the controller's (issue: a Client sends
functions with cloudpickle, which works only between the same versions).

On a cluster whose Python is this machine's, functions from here run (see
tests/test_cluster.py). Here: a cluster whose machines' system Python is
another, where the wanted Python cannot be downloaded, says so in plain words
at the end of site.yml and in cluster.json, and Jupyter's kernel on the
cluster still computes; and packages that cannot be installed stop site.yml
before any machine exists."""

from __future__ import annotations

import json
import sys

import pytest

from cluster_checks import run_in_kernel
from conftest import ROOT, docker_available, docker_objects, extra_ca_args, run_playbook

pytestmark = [
    pytest.mark.cluster,
    # make test-slow: make test must stay within CI's time.
    pytest.mark.slow,
    pytest.mark.skipif(not docker_available(), reason="needs a Docker engine (make docker)"),
]

HERE = "%d.%d" % sys.version_info[:2]
# The Debian whose system Python is not this machine's.
OTHER_OS, OTHER_PYTHON = ("debian-12", "3.11") if HERE == "3.13" else ("debian-13", "3.13")
CLUSTER = "pymix"


def teardown(cluster: str, name: str):
    return run_playbook("teardown.yml", "-e", "provider=docker", "-e", f"cluster_name={cluster}", name=name)


def test_a_cluster_on_another_python_says_so_and_its_kernel_computes():
    teardown(CLUSTER, "python-teardown-before")
    try:
        # No Python build can be downloaded from this mirror: the machines keep their own.
        run = run_playbook("site.yml", "-e", "provider=docker", "-e", f"cluster_name={CLUSTER}", "-e", "worker_count=1",
                           "-e", f"os_family={OTHER_OS}", "-e", "python_install_mirror=file:///nonexistent",
                           *extra_ca_args(), name="python-mismatch-site")
        assert f"The cluster runs Python {OTHER_PYTHON}, this machine Python {HERE}." in run.output
        assert "What fails: functions sent from this machine" in run.output
        assert "What works: Jupyter Lab on the cluster" in run.output
        assert f"Python      : {OTHER_PYTHON} (NOT this machine's {HERE}" in run.output
        summary = run.output.index("is ready:")
        assert run.output.index("The cluster runs Python") < summary, "said before the summary"

        info = json.loads((ROOT / ".clusters" / CLUSTER / "cluster.json").read_text())
        assert (info["python_version"], info["controller_python_version"]) == (OTHER_PYTHON, HERE)
        assert f"Python {OTHER_PYTHON}" in info["python_mismatch"]

        out = run_in_kernel(info, "\n".join([
            "import sys, distributed",
            "client = distributed.Client(timeout=30)",
            "print('PYTHON', '%d.%d' % sys.version_info[:2])",
            "print('RESULT', client.submit(lambda n: sum(range(n)), 101).result())",
        ]))
        assert dict(line.split(" ", 1) for line in out.strip().splitlines()) == {"PYTHON": OTHER_PYTHON, "RESULT": "5050"}
    finally:
        teardown(CLUSTER, "python-teardown-after")


def test_packages_that_cannot_be_installed_stop_site_before_any_machine_exists():
    cluster = "pybad"
    run = run_playbook("site.yml", "-e", "provider=docker", "-e", f"cluster_name={cluster}",
                       "-e", '{"extra_python_packages": ["dask-ec2-ansible-no-such-package-7f3a"]}',
                       *extra_ca_args(), check=False, name="python-bad-package")
    try:
        assert run.returncode != 0
        assert "cannot be installed together, so no machine was changed (and none was created)" in run.output
        assert "dask-ec2-ansible-no-such-package-7f3a" in run.output
        assert docker_objects("container", cluster) == []
        assert docker_objects("network", cluster) == []
    finally:
        teardown(cluster, "python-bad-package-teardown")
