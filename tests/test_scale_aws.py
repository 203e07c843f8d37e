"""Scaling from Python on the EC2 emulator, with no controller process running while the cluster scales:
scale_maximum above worker_count starts an autoscaler on the scheduler's machine (its own user and instance
profile); Cluster.scale(n) from this machine (cluster.json) asks the scheduler, the autoscaler launches the
workers from the baked image, cloud-init boots them, each enrolls for a certificate of its own and joins;
Cluster.scale(1) retires them through the scheduler with every result kept, and they are terminated.
teardown.yml then leaves no instance and no role.

Its own emulator (name and network), so that it runs beside the other emulator tests."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest

from cluster_checks import client_for, run_in_kernel
from emulator import running_emulator, wait_until
from conftest import ROOT, docker_available, extra_ca_args, run_playbook

boto3 = pytest.importorskip("boto3")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not docker_available(), reason="needs a Docker engine (make docker)"),
]

EMULATOR = "dask-ec2-emulator-scale-test"
# Not make demo-aws's (10.213), test_aws_cluster's (10.214), the bench's (10.215) or test_bake_aws's (10.216).
CIDR = "10.217.0.0/20"
REGION = "eu-west-1"
CLUSTER = "scaleaws"
STATE = ROOT / ".clusters" / CLUSTER
CLUSTER_TAG = "dask-ec2-ansible:cluster"
SCALE = ["-e", "worker_count=1", "-e", "scale_maximum=3"]


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with running_emulator(tmp_path_factory.mktemp("ec2-emulator-scale"), EMULATOR, CIDR, REGION) as emulator:
        yield emulator


def aws(emulator, service: str):
    return boto3.client(service, region_name=REGION, endpoint_url=emulator["endpoint"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def args(emulator, *extra: str) -> list[str]:
    return ["-e", f"@{emulator['state'] / 'vars.yml'}", *extra_ca_args(), *extra]


def live(emulator) -> list[dict]:
    pages = aws(emulator, "ec2").get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [CLUSTER]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


@pytest.fixture(scope="module")
def cluster(emulator):
    bake = run_playbook("bake.yml", *args(emulator, *SCALE), env=emulator["env"], name="scale-aws-bake")
    image_id = re.search(r"Baked (ami-[0-9a-f]+):", bake.output).group(1)
    try:
        first = run_playbook("site.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}", *SCALE,
                                               "-e", f"ami_id={image_id}"),
                             env=emulator["env"], name="scale-aws-site")
        yield {"first": first, "emulator": emulator, "image_id": image_id,
               "info": json.loads((STATE / "cluster.json").read_text())}
    finally:
        teardown = run_playbook("teardown.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}"), env=emulator["env"],
                                name="scale-aws-teardown", check=False)
        assert teardown.returncode == 0, teardown.output[-3000:]
        assert live(emulator) == []
        roles = aws(emulator, "iam").list_roles(PathPrefix="/dask-ec2-ansible/")["Roles"]
        assert [r["RoleName"] for r in roles if CLUSTER in r["RoleName"]] == []
        profiles = aws(emulator, "iam").list_instance_profiles(PathPrefix="/dask-ec2-ansible/")["InstanceProfiles"]
        assert [p["InstanceProfileName"] for p in profiles if CLUSTER in p["InstanceProfileName"]] == []


def ssh(info, *command: str) -> subprocess.CompletedProcess:
    scheduler = info["nodes"][f"dask-{CLUSTER}-scheduler"]
    return subprocess.run(["ssh", "-i", info["ssh_key"], "-o", "StrictHostKeyChecking=accept-new",
                           "-o", f"UserKnownHostsFile={STATE / 'known_hosts'}", "-o", "IdentitiesOnly=yes",
                           f"{info['ssh_user']}@{scheduler}", *command], capture_output=True, text=True, timeout=60)


def test_the_autoscaler_runs_on_the_scheduler_as_its_own_user_with_the_clusters_profile(cluster):
    info = cluster["info"]
    assert info["scaling"] == {"provider": "aws", "workers": 1, "minimum": 1, "maximum": 3, "adaptive": False,
                               "autoscaler": True}
    # The estimate before the launch counted the largest size (max_hourly_cost holds at it).
    assert re.search(r"2 x \S+.*workers the autoscaler may add", cluster["first"].output), cluster["first"].output[-4000:]
    state = ssh(info, "systemctl", "show", "-p", "ActiveState", "-p", "User", "dask-autoscaler.service")
    assert "ActiveState=active" in state.stdout and "User=dask-autoscaler" in state.stdout, state.stdout + state.stderr
    (scheduler,) = [i for i in live(cluster["emulator"]) if tags(i)["dask-ec2-ansible:role"] == "scheduler"]
    assert scheduler["IamInstanceProfile"]["Arn"].endswith(f"/dask-{CLUSTER}-{REGION}-autoscaler")
    # The issuing key is the autoscaler's alone; the cluster CA's key never left this machine.
    key = ssh(info, "sudo stat -c '%U %a' /etc/dask-ec2-ansible/autoscaler/issuing.key")
    assert key.stdout.strip() == "dask-autoscaler 600", key.stdout + key.stderr
    found = ssh(info, "sudo", "find", "/etc", "/var/lib", "/opt/dask", "-name", "ca.key")
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr
    assert (STATE / "tls" / "ca.key").is_file()


def test_scale_from_python_launches_workers_that_enroll_join_and_compute_then_scale_down_keeps_the_results(cluster):
    from dask_ec2_ansible import Cluster

    emulator, info = cluster["emulator"], cluster["info"]
    with Cluster.from_file(STATE / "cluster.json") as attached:
        start = time.monotonic()
        attached.scale(3)
        # This test process only watches: the autoscaler on the scheduler's machine does the work.
        wait_until(lambda: len(attached.scheduler_info["workers"]) == 3, 300, "3 workers joined")
        joined_after = time.monotonic() - start
        autoscaled = [i for i in live(emulator) if tags(i).get("dask-ec2-ansible:autoscaled") == "true"]
        assert len(autoscaled) == 2
        names = {w["name"] for w in attached.scheduler_info["workers"].values()}
        assert names == {f"dask-{CLUSTER}-worker-1", *(i["InstanceId"] for i in autoscaled)}
        for instance in autoscaled:
            assert tags(instance)["Name"] == f"dask-{CLUSTER}-worker-{instance['InstanceId']}"
            assert instance["ImageId"] == cluster["image_id"]
        client = client_for(info)
        try:
            assert len(client.run(lambda: 1)) == 3
            futures = client.scatter(list(range(100)))
            spread = {w for f in futures for w in client.who_has([f])[f.key]}
            assert len(spread) == 3
            attached.scale(1)
            wait_until(lambda: len(attached.scheduler_info["workers"]) == 1, 180, "back to 1 worker")
            assert client.gather(futures) == list(range(100))
            wait_until(lambda: not [i for i in live(emulator) if tags(i).get("dask-ec2-ansible:autoscaled")],
                       120, "the autoscaled workers terminated")
        finally:
            client.close()
    print(f"scale(3): 3 workers joined after {joined_after:.0f} s")
    # A kernel's Cluster() sees the same limits.
    out = run_in_kernel(info, "from dask_ec2_ansible import Cluster\nc = Cluster()\nprint(c.limits['maximum'])")
    assert out.strip() == "3"
