"""The aws provider against moto_server, a local EC2 API (no AWS account, no internet).

What this proves: the playbooks create, re-find, scale and remove the right EC2
resources with the right settings, refuse bad input before creating anything,
and the aws inventory groups the machines. What it cannot prove: that the
machines boot and accept SSH (moto's instances are records, `running` at once),
spot capacity and its fallback, real AMIs, real IAM evaluation of every call.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN, run_playbook

boto3 = pytest.importorskip("boto3")

REGION = "eu-west-1"
CLUSTER = "awsci"
CLUSTER_TAG = "dask-ec2-ansible:cluster"
CIDRS = ["198.51.100.7/32", "203.0.113.0/24"]
BASE_ARGS = ["-e", "provider=aws", "-e", json.dumps({"allowed_cidrs": CIDRS, "cluster_tags": {"project": "ci"}})]
CANONICAL, DEBIAN, AMAZON = "099720109477", "136693071363", "137112412989"


def _ami(number: int, name: str, owner: str, arch: str, date: str, root: str) -> dict:
    return {
        "ami_id": f"ami-0{number:016x}", "name": name, "description": name, "owner_id": owner,
        "public": True, "virtualization_type": "hvm", "architecture": arch, "state": "available",
        "platform": None, "image_type": "machine", "hypervisor": "xen", "root_device_name": root,
        "root_device_type": "ebs", "sriov": "simple", "creation_date": date,
    }


# moto's own AMI list is ancient; these look like today's official images.
AMIS = [
    _ami(1, "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250115", CANONICAL, "x86_64",
         "2025-01-15T10:00:00.000Z", "/dev/sda1"),
    _ami(2, "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20250610", CANONICAL, "x86_64",
         "2025-06-10T10:00:00.000Z", "/dev/sda1"),
    _ami(3, "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-20250610", CANONICAL, "arm64",
         "2025-06-10T10:00:00.000Z", "/dev/sda1"),
    _ami(4, "debian-12-amd64-20250610-2138", DEBIAN, "x86_64", "2025-06-10T10:00:00.000Z", "/dev/xvda"),
    _ami(5, "al2023-ami-2023.7.20250609.0-kernel-6.1-x86_64", AMAZON, "x86_64", "2025-06-09T10:00:00.000Z", "/dev/xvda"),
    # Same name pattern, newer, but not from Canonical: must never be chosen.
    _ami(6, "ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20991231", "666666666666", "x86_64",
         "2099-12-31T10:00:00.000Z", "/dev/sda1"),
    # Debian 13 (the aws default): two releases of amd64, one of arm64.
    _ami(7, "debian-13-amd64-20250814-2204", DEBIAN, "x86_64", "2025-08-14T10:00:00.000Z", "/dev/xvda"),
    _ami(8, "debian-13-amd64-20251006-2257", DEBIAN, "x86_64", "2025-10-06T10:00:00.000Z", "/dev/xvda"),
    _ami(9, "debian-13-arm64-20251006-2257", DEBIAN, "arm64", "2025-10-06T10:00:00.000Z", "/dev/xvda"),
    # Same name pattern, newer, but not from Debian: must never be chosen.
    _ami(10, "debian-13-amd64-20991231-9999", "666666666666", "x86_64", "2099-12-31T10:00:00.000Z", "/dev/xvda"),
]
NEWEST_UBUNTU_AMD64 = AMIS[1]["ami_id"]
NEWEST_DEBIAN13_AMD64 = AMIS[7]["ami_id"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that could reach a real AWS account."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(ROOT / "tests" / "artifacts" / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(ROOT / "tests" / "artifacts" / "no-aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@contextlib.contextmanager
def moto_server(state: Path, **extra_env: str):
    """moto_server on a free local port with the realistic AMIs; yields its endpoint URL."""
    amis = state / "amis.json"
    amis.write_text(json.dumps(AMIS))
    port = _free_port()
    log = (state / "moto.log").open("w")
    server = subprocess.Popen(
        [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=dict(_clean_env(), MOTO_AMIS_PATH=str(amis), **extra_env), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto_server did not start: {(state / 'moto.log').read_text()}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def aws_env(endpoint: str, key_id: str = "testing", secret: str = "testing") -> dict[str, str]:
    return dict(_clean_env(), AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret,
                AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION)


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """moto_server on a free local port; yields the environment for the playbooks."""
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield aws_env(endpoint)


def ec2(env):
    return boto3.client(
        "ec2", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def instances(env, cluster=CLUSTER, states=("pending", "running", "stopping", "stopped")):
    """{Name tag: instance} of the cluster's live instances."""
    pages = ec2(env).get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
                 {"Name": "instance-state-name", "Values": list(states)}])
    found = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    return {tags(i)["Name"]: i for i in found}


def tags(resource) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def iam_leftovers(env, cluster) -> list[str]:
    """The cluster's own IAM role and instance profile (s3_*_buckets), by name: a user's policy may not list."""
    client = boto3.client("iam", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    name, found = f"dask-{cluster}-{REGION}", []
    for kind, call in (("role", lambda: client.get_role(RoleName=name)),
                       ("instance-profile", lambda: client.get_instance_profile(InstanceProfileName=name))):
        try:
            call()
            found.append(f"{kind}/{name}")
        except client.exceptions.NoSuchEntityException:
            pass
    return found


def leftovers(env, cluster):
    client = ec2(env)
    cluster_filter = [{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
    return {
        "instances": sorted(instances(env, cluster)),
        "security_groups": [g["GroupName"] for g in client.describe_security_groups(Filters=cluster_filter)["SecurityGroups"]],
        "key_pairs": [k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"] if k["KeyName"] == f"dask-{cluster}"],
        "tagged_key_pairs": [k["KeyName"] for k in client.describe_key_pairs(Filters=cluster_filter)["KeyPairs"]],
        "launch_templates": [t["LaunchTemplateName"] for t in client.describe_launch_templates()["LaunchTemplates"]
                             if t["LaunchTemplateName"].startswith(f"dask-{cluster}-")],
        "iam": iam_leftovers(env, cluster),
    }


def nothing_left(env, cluster):  # noqa: ARG001 (same call shape as leftovers)
    return {"instances": [], "security_groups": [], "key_pairs": [], "tagged_key_pairs": [], "launch_templates": [],
            "iam": []}


def provision(env, *args, cluster=CLUSTER, name=None, check=True):
    return run_playbook("playbooks/provision.yml", *BASE_ARGS, "-e", f"cluster_name={cluster}", *args,
                        env=env, name=name, check=check)


@pytest.fixture(scope="module")
def cluster(aws):
    # A profile of the user's own (iam_instance_profile), made as a user makes it, for the machines.
    iam = boto3.client("iam", region_name=REGION, endpoint_url=aws["AWS_ENDPOINT_URL"],
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    iam.create_role(RoleName="my-machines", AssumeRolePolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
    iam.create_instance_profile(InstanceProfileName="my-machines")
    iam.add_role_to_instance_profile(InstanceProfileName="my-machines", RoleName="my-machines")
    first = provision(aws, "-e", "worker_count=2", "-e", "iam_instance_profile=my-machines", name="aws-provision-first")
    yield {"env": aws, "first": first, "instances": instances(aws)}


def test_provision_creates_one_scheduler_and_numbered_workers(cluster):
    assert sorted(cluster["instances"]) == [f"dask-{CLUSTER}-scheduler", f"dask-{CLUSTER}-worker-1", f"dask-{CLUSTER}-worker-2"]
    for name, inst in cluster["instances"].items():
        assert inst["State"]["Name"] == "running", name
        assert inst["ImageId"] == NEWEST_DEBIAN13_AMD64, "newest official Debian 13, never a look-alike"
        assert inst["KeyName"] == f"dask-{CLUSTER}"
    assert cluster["instances"][f"dask-{CLUSTER}-scheduler"]["InstanceType"] == "t3.large"
    assert cluster["instances"][f"dask-{CLUSTER}-worker-1"]["InstanceType"] == "m6i.large"


def test_the_machines_carry_the_users_own_instance_profile(cluster):
    assert {inst["IamInstanceProfile"]["Arn"] for inst in cluster["instances"].values()} == {
        "arn:aws:iam::123456789012:instance-profile/my-machines"}
    assert iam_leftovers(cluster["env"], CLUSTER) == [], "no role of the cluster's own beside the user's"


def test_every_resource_is_tagged(cluster):
    env, client = cluster["env"], ec2(cluster["env"])
    caller = boto3.client("sts", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).get_caller_identity()
    # owner-id is what IAM's aws:userid names the caller: the shipped policy lets only them change it.
    expected = {CLUSTER_TAG: CLUSTER, "dask-ec2-ansible:created-by": "dask-ec2-ansible", "project": "ci",
                "dask-ec2-ansible:owner": caller["Arn"], "dask-ec2-ansible:owner-id": caller["UserId"]}
    resources = {f"instance {n}": i for n, i in cluster["instances"].items()}
    for volume in client.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [
            i["InstanceId"] for i in cluster["instances"].values()]}])["Volumes"]:
        resources[f"volume {volume['VolumeId']}"] = volume
    resources["security group"] = client.describe_security_groups(GroupNames=[f"dask-{CLUSTER}"])["SecurityGroups"][0]
    resources["key pair"] = client.describe_key_pairs(KeyNames=[f"dask-{CLUSTER}"])["KeyPairs"][0]
    assert len(resources) == 3 + 3 + 2
    for what, resource in resources.items():
        assert expected.items() <= tags(resource).items(), (what, tags(resource))
    roles = {n: tags(i)["dask-ec2-ansible:role"] for n, i in cluster["instances"].items()}
    assert roles == {f"dask-{CLUSTER}-scheduler": "scheduler", f"dask-{CLUSTER}-worker-1": "worker",
                     f"dask-{CLUSTER}-worker-2": "worker"}
    assert {tags(i)["dask-ec2-ansible:ssh-user"] for i in cluster["instances"].values()} == {"admin"}


def test_instances_are_hardened(cluster):
    client = ec2(cluster["env"])
    for name, inst in cluster["instances"].items():
        assert inst["MetadataOptions"]["HttpTokens"] == "required", name
        behaviour = client.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
        # idle_shutdown: the scheduler keeps its disk (stopped), a worker goes (terminated).
        expected = "stop" if name.endswith("-scheduler") else "terminate"
        assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == expected, name
        root = [m for m in inst["BlockDeviceMappings"] if m["DeviceName"] == inst["RootDeviceName"]]
        assert root, f"{name}: no root volume mapping"
        volume = client.describe_volumes(VolumeIds=[root[0]["Ebs"]["VolumeId"]])["Volumes"][0]
        assert (volume["VolumeType"], volume["Encrypted"], volume["Size"]) == ("gp3", True, 30), name


PUBLIC_PORTS, CLUSTER_PORTS = [22, 8888], [8786, 8788, 8789]


def group_rules(env) -> tuple[dict, set]:
    """The cluster's security group and its ingress rules as {(port, CIDR or "self")}."""
    group = ec2(env).describe_security_groups(GroupNames=[f"dask-{CLUSTER}"])["SecurityGroups"][0]
    rules = set()
    for perm in group["IpPermissions"]:
        assert perm["IpProtocol"] == "tcp"
        for port in range(perm["FromPort"], perm["ToPort"] + 1):
            rules |= {(port, r["CidrIp"]) for r in perm.get("IpRanges", [])}
            rules |= {(port, "self") for p in perm.get("UserIdGroupPairs", []) if p["GroupId"] == group["GroupId"]}
            assert all(p["GroupId"] == group["GroupId"] for p in perm.get("UserIdGroupPairs", []))
            assert not perm.get("Ipv6Ranges")
    return group, rules


def test_security_group_allows_exactly_what_is_specified(cluster):
    group, rules = group_rules(cluster["env"])
    expected = {(p, c) for p in PUBLIC_PORTS + CLUSTER_PORTS for c in CIDRS} | {(p, "self") for p in CLUSTER_PORTS}
    assert rules == expected
    assert all(inst["SecurityGroups"] == [{"GroupName": group["GroupName"], "GroupId": group["GroupId"]}]
               for inst in cluster["instances"].values())


def test_key_pair_is_the_clusters_own_key(cluster):
    key = ec2(cluster["env"]).describe_key_pairs(KeyNames=[f"dask-{CLUSTER}"])["KeyPairs"][0]
    private = ROOT / ".clusters" / CLUSTER / "ssh" / "id_ed25519"
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert (private.parent / "id_ed25519.pub").read_text().startswith("ssh-ed25519 ")
    assert key["KeyType"] == "ed25519"


def test_second_run_changes_nothing(cluster):
    run = provision(cluster["env"], "-e", "worker_count=2", name="aws-provision-second")
    assert run.changed == 0, run.changed_tasks()
    assert {n: i["InstanceId"] for n, i in instances(cluster["env"]).items()} == \
        {n: i["InstanceId"] for n, i in cluster["instances"].items()}


def test_a_colleagues_cluster_of_the_same_name_is_refused_and_left_alone(cluster):
    """One account, two IAM users, one cluster name: the second user's site.yml and teardown stop before
    anything is changed (teardown before starting or saving anything), saying whose the cluster is; their
    teardown all_mine does not count it as theirs."""
    env = cluster["env"]
    iam = boto3.client("iam", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    iam.create_user(UserName="colleague")
    key = iam.create_access_key(UserName="colleague")["AccessKey"]
    colleague = aws_env(env["AWS_ENDPOINT_URL"], key["AccessKeyId"], key["SecretAccessKey"])
    owner = boto3.client("sts", region_name=REGION, endpoint_url=env["AWS_ENDPOINT_URL"],
                         aws_access_key_id="testing", aws_secret_access_key="testing").get_caller_identity()["Arn"]

    def state():
        client = ec2(env)
        return {"instances": {n: (i["InstanceId"], i["State"]["Name"], tags(i)) for n, i in instances(env).items()},
                "group": group_rules(env), "group_tags": tags(group_rules(env)[0]),
                "key": client.describe_key_pairs(KeyNames=[f"dask-{CLUSTER}"])["KeyPairs"][0],
                "templates": leftovers(env, CLUSTER)["launch_templates"]}

    before = state()
    assert {tags["dask-ec2-ansible:owner"] for _, _, tags in before["instances"].values()} == {owner}
    refusal = (f"Cluster '{CLUSTER}' in {REGION} belongs to {owner} (instance dask-{CLUSTER}-scheduler, ")
    remedy = f"not to you (arn:aws:iam::123456789012:user/colleague). Nothing was changed. Pick a name of your own, " \
             f"e.g. -e cluster_name={CLUSTER}-colleague"
    site = run_playbook("site.yml", *BASE_ARGS, "-e", f"cluster_name={CLUSTER}", "-e", "worker_count=3",
                        env=colleague, check=False, name="aws-colleague-site")
    teardown = run_playbook("teardown.yml", "-e", "provider=aws", "-e", f"cluster_name={CLUSTER}", env=colleague,
                            check=False, name="aws-colleague-teardown")
    for run in (site, teardown):
        assert run.returncode != 0
        assert refusal in run.output, run.output[-3000:]
        assert remedy in " ".join(run.output.split()), run.output[-3000:]
    assert "PLAY [Provision the cluster's machines]" not in site.output
    assert "PLAY [Find the scheduler whose work is saved first]" not in teardown.output
    mine = run_playbook("teardown.yml", "-e", "provider=aws", "-e", "cluster_name=all_mine", "-e", "confirm=yes",
                        "-e", f"regions={REGION}", env=colleague, name="aws-colleague-all-mine")
    assert "Nothing of arn:aws:iam::123456789012:user/colleague to remove." in mine.output, mine.output[-3000:]
    assert state() == before
    # The owner runs on as before.
    assert provision(env, "-e", "worker_count=2", name="aws-provision-owner-after-colleague").changed == 0


def test_tunnel_only_opens_nothing_but_ssh_to_allowed_cidrs(cluster):
    """The recipe of docs/working.md: everything else through make tunnel; the machines still reach each other."""
    run = provision(cluster["env"], "-e", "worker_count=2", "-e", "tunnel_only=true", name="aws-provision-tunnel-only")
    assert run.changed > 0
    assert group_rules(cluster["env"])[1] == {(22, c) for c in CIDRS} | {(p, "self") for p in CLUSTER_PORTS}
    provision(cluster["env"], "-e", "worker_count=2", name="aws-provision-tunnel-only-undone")
    expected = {(p, c) for p in PUBLIC_PORTS + CLUSTER_PORTS for c in CIDRS} | {(p, "self") for p in CLUSTER_PORTS}
    assert group_rules(cluster["env"])[1] == expected


def test_ubuntu_when_asked_is_canonicals_newest(aws):
    """os_family ubuntu-24.04 stays selectable: Canonical's newest image, its user ubuntu."""
    name = "awsubuntu"
    try:
        provision(aws, "-e", "os_family=ubuntu-24.04", "-e", "worker_count=1", cluster=name, name="aws-provision-ubuntu")
        found = instances(aws, name)
        assert sorted(found) == [f"dask-{name}-scheduler", f"dask-{name}-worker-1"]
        for inst in found.values():
            assert inst["ImageId"] == NEWEST_UBUNTU_AMD64, "newest official Ubuntu 24.04, never a look-alike"
            assert tags(inst)["dask-ec2-ansible:ssh-user"] == "ubuntu"
    finally:
        # save_work=false: on plain moto no machine answers, and the save would try SSH to moto's invented
        # public addresses (tests/test_faults.py proves the path of machines that do not answer).
        run_playbook("teardown.yml", "-e", "provider=aws", "-e", f"cluster_name={name}", "-e", "save_work=false",
                     env=aws, name="aws-teardown-ubuntu")
    assert leftovers(aws, name) == nothing_left(aws, name)


def plain(value):
    """ansible-inventory --list marks untrusted strings as {"__ansible_unsafe": "..."}."""
    if isinstance(value, dict):
        return value["__ansible_unsafe"] if set(value) == {"__ansible_unsafe"} else {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def inventory(env):
    proc = subprocess.run([str(VENV_BIN / "ansible-inventory"), "--list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return plain(json.loads(proc.stdout)), proc.stderr


def test_inventory_groups_the_cluster_with_its_host_vars(cluster):
    data, _ = inventory(cluster["env"])
    assert sorted(data[f"cluster_{CLUSTER}"]["hosts"]) == sorted(cluster["instances"])
    hostvars = data["_meta"]["hostvars"]
    for name, inst in cluster["instances"].items():
        assert hostvars[name]["dask_node_group"] == ("scheduler" if name.endswith("scheduler") else "workers")
        assert hostvars[name]["ansible_host"] == inst["PublicIpAddress"]
        assert hostvars[name]["ansible_user"] == "admin"
        assert "tags" not in hostvars[name], "the reserved name `tags` would warn on every run"


def test_inventory_is_quiet_for_a_provider_that_is_not_set_up(tmp_path):
    """No AWS credentials and no Docker engine: no hosts from either, and no warning about them."""
    env = dict(_clean_env(), DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    proc = subprocess.run([str(VENV_BIN / "ansible-inventory"), "--list", "-v"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr
    assert "no AWS credentials are configured" in proc.stdout + proc.stderr
    assert "no Docker engine" in proc.stdout + proc.stderr
    data = json.loads(proc.stdout[proc.stdout.index("\n{") + 1:])
    assert data["_meta"]["hostvars"] == {}


def test_scale_up_keeps_the_machines_and_adds_the_next_number(cluster):
    env, before = cluster["env"], cluster["instances"]
    provision(env, "-e", "worker_count=3", name="aws-provision-scale-up")
    after = instances(env)
    assert sorted(after) == sorted([*before, f"dask-{CLUSTER}-worker-3"])
    assert all(after[n]["InstanceId"] == before[n]["InstanceId"] for n in before)


NO_SSH_HERE = "127.0.0.3"


def test_scale_down_removes_the_highest_numbers_and_keeps_the_rest(cluster):
    env, before = cluster["env"], instances(cluster["env"])
    # The machines are moto's, with invented public addresses: the scheduler's SSH port is probed at a
    # loopback address where nothing listens instead, so no packet leaves this machine.
    with socket.socket() as probe:
        assert probe.connect_ex((NO_SSH_HERE, 22)) != 0, f"something listens on {NO_SSH_HERE}:22"
    run = provision(env, "-e", "worker_count=1", "-e", f"ansible_host={NO_SSH_HERE}", name="aws-provision-scale-down")
    after = instances(env)
    assert sorted(after) == [f"dask-{CLUSTER}-scheduler", f"dask-{CLUSTER}-worker-1"]
    assert all(after[n]["InstanceId"] == before[n]["InstanceId"] for n in after)
    gone = {before[n]["InstanceId"] for n in (f"dask-{CLUSTER}-worker-2", f"dask-{CLUSTER}-worker-3")}
    states = {i["InstanceId"]: i["State"]["Name"] for r in ec2(env).describe_instances(InstanceIds=sorted(gone))["Reservations"]
              for i in r["Instances"]}
    assert set(states.values()) == {"terminated"}
    # The scheduler was asked first: unreachable here (moto), so retiring is skipped, not failed.
    assert f"Retire the workers: dask-{CLUSTER}-worker-2, dask-{CLUSTER}-worker-3" in run.output


def test_teardown_removes_everything_and_can_run_twice(cluster):
    env = cluster["env"]
    assert leftovers(env, CLUSTER) != nothing_left(env, CLUSTER)
    # save_work=false: see test_ubuntu_when_asked_is_canonicals_newest.
    run_playbook("teardown.yml", "-e", "provider=aws", "-e", f"cluster_name={CLUSTER}", "-e", "save_work=false",
                 env=env, name="aws-teardown")
    assert leftovers(env, CLUSTER) == nothing_left(env, CLUSTER)
    assert not (ROOT / ".clusters" / CLUSTER).exists()
    again = run_playbook("teardown.yml", "-e", "provider=aws", "-e", f"cluster_name={CLUSTER}", env=env,
                         name="aws-teardown-again")
    assert again.changed == 0, again.changed_tasks()


def test_teardown_after_a_half_finished_run(aws):
    """Key pair and security group made, no instance (as when a launch fails)."""
    half = "awshalf"
    client = ec2(aws)
    client.create_key_pair(KeyName=f"dask-{half}", TagSpecifications=[{"ResourceType": "key-pair", "Tags": [
        {"Key": CLUSTER_TAG, "Value": half}, {"Key": "dask-ec2-ansible:created-by", "Value": "dask-ec2-ansible"}]}])
    client.create_security_group(GroupName=f"dask-{half}", Description="half", TagSpecifications=[
        {"ResourceType": "security-group", "Tags": [{"Key": CLUSTER_TAG, "Value": half},
                                                    {"Key": "dask-ec2-ansible:created-by", "Value": "dask-ec2-ansible"}]}])
    run_playbook("teardown.yml", "-e", "provider=aws", "-e", f"cluster_name={half}", env=aws, name="aws-teardown-half")
    assert leftovers(aws, half) == nothing_left(aws, half)


BAD_INPUTS = [
    ({}, ["-e", "aws_region=moon-base-1"], "is not an AWS region name"),
    ({"AWS_REGION": "eu-west-9", "AWS_DEFAULT_REGION": "eu-west-9"}, ["-e", "aws_region=eu-west-9"],
     "is not a region this account can use"),
    ({}, ["-e", "aws_region=eu-west-2"], "export AWS_REGION=eu-west-2"),
    ({}, ["-e", "scheduler_instance_type=t3-large"], "is not an EC2 instance type name"),
    ({}, ["-e", "worker_count=0"], "worker_count must be a whole number of at least 1"),
    ({}, ["-e", '{"allowed_cidrs": ["0.0.0.0/0"]}'], "allow_world_open=true"),
    ({}, ["-e", '{"allowed_cidrs": ["10.0.0.300/32"]}'], "allowed_cidrs must be IPv4 networks"),
    ({}, ["-e", "os_family=windows"], "os_family"),
    ({}, ["-e", "os_family=amazonlinux-2023"], "its system Python is 3.9"),
    ({}, ["-e", "aws_private_network=true"], "aws_private_network=true needs vpc_subnet_id"),
    ({}, ["-e", '{"aws_private_network": true, "vpc_subnet_id": "subnet-0123abcd", "allowed_cidrs": []}'],
     "the private range of your VPN or of the VPC"),
    ({}, ["-e", '{"vpc_subnet_ids": ["subnet-0123456789abcdef0", "eu-west-1a"]}'], "vpc_subnet_ids must be subnet ids"),
    ({"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}, [], "No usable AWS credentials"),
    ({}, ["-e", "s3_read_buckets=data-a"], "s3_read_buckets must be a list (got str)"),
    ({}, ["-e", '{"s3_write_buckets": ["results"], "iam_instance_profile": "mine"}'], "set one of the two"),
    ({}, ["-e", '{"s3_read_buckets": ["no-such-bucket-here/x"]}'], "S3 has no bucket no-such-bucket-here"),
]


@pytest.mark.parametrize(("env_change", "args", "message"), BAD_INPUTS,
                         ids=[m.split(" ")[0] + ":" + " ".join(a)[:40] for _, a, m in BAD_INPUTS])
def test_bad_input_is_refused_before_anything_is_created(aws, env_change, args, message):
    env = {k: v for k, v in {**aws, **env_change}.items() if v is not None}
    run = provision(env, *args, cluster="awsbad", check=False, name=None)
    assert run.returncode != 0
    assert message in run.output, run.output[-3000:]
    assert "PLAY [Provision the cluster's machines]" not in run.output
    assert leftovers(aws, "awsbad") == nothing_left(aws, "awsbad")
    assert not (ROOT / ".clusters" / "awsbad").exists()


# What each amazon.aws module this project uses calls, as IAM actions (from the
# modules' code, amazon.aws 10.1.2). The shipped policy must allow all of them.
MODULE_ACTIONS = {
    "aws_caller_info": {"sts:GetCallerIdentity"},
    "aws_region_info": {"ec2:DescribeRegions"},
    "ec2_ami_info": {"ec2:DescribeImages"},
    # state: present from an instance only (bake.yml); tags are added after the image exists
    "ec2_ami": {"ec2:CreateImage", "ec2:DescribeImages", "ec2:DescribeImageAttribute"},
    # state: present on an image and its snapshots (bake.yml)
    "ec2_tag": {"ec2:DescribeTags", "ec2:CreateTags", "ec2:DeleteTags"},
    "ec2_key": {"ec2:DescribeKeyPairs", "ec2:ImportKeyPair", "ec2:DeleteKeyPair", "ec2:CreateTags", "ec2:DeleteTags"},
    "ec2_key_info": {"ec2:DescribeKeyPairs"},
    "ec2_vpc_net_info": {"ec2:DescribeVpcs", "ec2:DescribeVpcAttribute"},
    "ec2_vpc_subnet_info": {"ec2:DescribeSubnets"},
    "ec2_security_group": {"ec2:DescribeSecurityGroups", "ec2:CreateSecurityGroup", "ec2:DeleteSecurityGroup",
                           "ec2:AuthorizeSecurityGroupIngress", "ec2:RevokeSecurityGroupIngress",
                           "ec2:AuthorizeSecurityGroupEgress", "ec2:RevokeSecurityGroupEgress",
                           "ec2:UpdateSecurityGroupRuleDescriptionsIngress", "ec2:CreateTags", "ec2:DeleteTags",
                           "sts:GetCallerIdentity"},
    "ec2_security_group_info": {"ec2:DescribeSecurityGroups"},
    "ec2_launch_template": {"ec2:DescribeLaunchTemplates", "ec2:DescribeLaunchTemplateVersions",
                            "ec2:CreateLaunchTemplate", "ec2:CreateLaunchTemplateVersion", "ec2:ModifyLaunchTemplate",
                            "ec2:DeleteLaunchTemplate"},
    "ec2_instance": {"ec2:DescribeInstances", "ec2:RunInstances", "ec2:TerminateInstances", "ec2:StartInstances",
                     "ec2:DescribeInstanceAttribute", "ec2:ModifyInstanceAttribute", "ec2:DescribeVpcs",
                     "ec2:DescribeSubnets", "ec2:CreateTags", "ec2:DeleteTags", "ec2:DescribeInstanceStatus",
                     "ec2:ModifyInstanceMetadataOptions", "iam:PassRole"},
    "ec2_instance_info": {"ec2:DescribeInstances"},
    # state: absent only (teardown deletes a cluster's unattached volumes)
    "ec2_vol": {"ec2:DescribeVolumes", "ec2:DeleteVolume"},
    "ec2_vol_info": {"ec2:DescribeVolumes"},
    # s3_*_buckets: the cluster's own role, its instance profile and inline policy; teardown removes them
    "iam_role": {"iam:GetRole", "iam:CreateRole", "iam:DeleteRole", "iam:TagRole", "iam:UntagRole",
                 "iam:PutRolePermissionsBoundary",
                 "iam:UpdateRole", "iam:UpdateAssumeRolePolicy", "iam:ListRolePolicies", "iam:DeleteRolePolicy",
                 "iam:ListAttachedRolePolicies", "iam:ListInstanceProfilesForRole", "iam:GetInstanceProfile",
                 "iam:CreateInstanceProfile", "iam:DeleteInstanceProfile", "iam:TagInstanceProfile",
                 "iam:AddRoleToInstanceProfile", "iam:RemoveRoleFromInstanceProfile"},
    "iam_instance_profile": {"iam:GetInstanceProfile", "iam:CreateInstanceProfile", "iam:DeleteInstanceProfile",
                             "iam:AddRoleToInstanceProfile", "iam:RemoveRoleFromInstanceProfile",
                             "iam:TagInstanceProfile", "iam:UntagInstanceProfile"},
    "iam_role_info": {"iam:GetRole", "iam:ListRolePolicies", "iam:ListAttachedRolePolicies",
                      "iam:ListInstanceProfilesForRole", "iam:ListRoleTags"},
    "iam_policy": {"iam:GetRolePolicy", "iam:ListRolePolicies", "iam:PutRolePolicy", "iam:DeleteRolePolicy"},
}


def test_iam_policy_allows_every_call_the_playbooks_make():
    policy = json.loads((ROOT / "iam" / "dask-ec2-ansible-policy.json").read_text())
    allowed = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        actions = statement["Action"]
        allowed |= {actions} if isinstance(actions, str) else set(actions)
    assert not any("*" in action for action in allowed), "no wildcard actions"
    used = set()
    for path in [*(ROOT / "roles").rglob("*.yml"), *(ROOT / "playbooks").rglob("*.yml")]:
        used |= {m for m in MODULE_ACTIONS if f"amazon.aws.{m}:" in path.read_text()}
    text = "\n".join(p.read_text() for p in [*(ROOT / "roles").rglob("*.yml"), *(ROOT / "playbooks").rglob("*.yml")])
    unknown = {line.split("amazon.aws.")[1].rstrip(":").strip() for line in text.splitlines() if "amazon.aws." in line
               and line.strip().startswith("amazon.aws.")} - set(MODULE_ACTIONS)
    assert not unknown, f"modules without a known IAM footprint: {unknown}"
    missing = set().union(*(MODULE_ACTIONS[m] for m in used)) - allowed
    assert not missing, f"the policy lacks {sorted(missing)}"
    assert "ec2:DescribeInstances" in allowed  # the aws inventory


def test_iam_policy_allows_every_call_of_our_own_modules():
    """Our modules call boto3 directly (launch, status, cost): each API call they name must be allowed."""
    policy = json.loads((ROOT / "iam" / "dask-ec2-ansible-policy.json").read_text())
    allowed = set()
    for statement in policy["Statement"]:
        allowed |= {statement["Action"]} if isinstance(statement["Action"], str) else set(statement["Action"])
    calls = set()
    for path in [*(ROOT / "plugins" / "modules").glob("*.py"), *(ROOT / "plugins" / "module_utils").glob("*.py")]:
        text = path.read_text()
        calls |= set(re.findall(r"[.]((?:describe|run|terminate|create|delete)_[a-z_]+|get_products)[(]", text))
        calls |= set(re.findall(r'"(describe_[a-z_]+)"', text))  # paginators
    assert {"run_instances", "terminate_instances", "describe_instances", "get_products"} <= calls
    actions = {("pricing:" if call == "get_products" else "ec2:") + "".join(w.title() for w in call.split("_"))
               for call in calls}
    assert not actions - allowed, f"the policy lacks {sorted(actions - allowed)}"


def as_moto_evaluates(policy: dict) -> dict:
    """The policy with every statement's Resource "*", all else (actions, effects, conditions) as shipped.

    moto authorizes every EC2 request against the resource "*" (it works out no
    ARN: moto/core/responses.py call_action; only iam and sts have a
    _determine_resource), so a statement scoped to ARNs can never match there."""
    return {**policy, "Statement": [{**statement, "Resource": "*"} for statement in policy["Statement"]]}


def refused(call) -> str:
    """The error code of a call that must be refused."""
    try:
        call()
    except boto3.session.botocore.exceptions.ClientError as error:
        return error.response["Error"]["Code"]
    pytest.fail("the call was allowed")


def test_iam_policy_suffices_under_moto_iam_enforcement(tmp_path):
    """provision.yml and teardown.yml with only a user's keys whose one policy is the shipped one, for a cluster
    with S3 buckets by name: the role it makes allows exactly those buckets, as IAM holds it and as S3 enforces it.

    moto enforces IAM once INITIAL_NO_AUTH_ACTION_COUNT requests (the set-up
    below, made as root) are spent: every later request must be signed by a
    known user's key and its action allowed by that user's policies (and, for
    a role's session, by the role's)."""
    shipped = json.loads((ROOT / "iam" / "dask-ec2-ansible-policy.json").read_text())
    users = {"dask-shipped": shipped, "dask-moto-view": as_moto_evaluates(shipped)}
    # 4 requests per user; the boundary; 3 buckets, 2 objects and a session of the cluster's role.
    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT=str(4 * len(users) + 7)) as endpoint:
        root = boto3.client("iam", region_name=REGION, endpoint_url=endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")
        # What the account's administrator makes beside the user's policy (docs/aws.md): the boundary of every
        # role the toolkit makes.
        boundary = root.create_policy(
            PolicyName="dask-ec2-ansible-machines-boundary", Path="/dask-ec2-ansible/",
            PolicyDocument=(ROOT / "iam" / "dask-ec2-ansible-machines-boundary.json").read_text())["Policy"]["Arn"]
        assert boundary == "arn:aws:iam::123456789012:policy/dask-ec2-ansible/dask-ec2-ansible-machines-boundary"
        envs = {}
        for user, document in users.items():  # 4 requests each
            root.create_user(UserName=user)
            arn = root.create_policy(PolicyName=user, PolicyDocument=json.dumps(document))["Policy"]["Arn"]
            root.attach_user_policy(UserName=user, PolicyArn=arn)
            key = root.create_access_key(UserName=user)["AccessKey"]
            envs[user] = aws_env(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        for bucket, region in (("data-a", REGION), ("results-b", "us-west-2"), ("other-c", REGION)):
            s3_root = boto3.client("s3", region_name=region, endpoint_url=endpoint,
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
            s3_root.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
        s3_root.put_object(Bucket="data-a", Key="raw/table.csv", Body=b"x,y\n1,2\n")
        s3_root.put_object(Bucket="other-c", Key="secret.csv", Body=b"no")
        # What a machine's metadata service hands out: a session of the cluster's role (moto answers AssumeRole
        # with a 500 once it enforces IAM, so the session is taken now; the role's policy, made by provision.yml
        # below, is looked up at each request).
        role_arn = f"arn:aws:iam::123456789012:role/dask-ec2-ansible/dask-awsiam-{REGION}"
        keys = boto3.client("sts", region_name=REGION, endpoint_url=endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing").assume_role(
            RoleArn=role_arn, RoleSessionName="i-0machine")["Credentials"]
        env = envs["dask-moto-view"]

        def client(service, user="dask-moto-view", **keys):
            return boto3.client(service, region_name=REGION, endpoint_url=endpoint, **(keys or {
                "aws_access_key_id": envs[user]["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": envs[user]["AWS_SECRET_ACCESS_KEY"]}))

        # Enforcement is on: the root keys are now unknown, and what the policy lacks is refused.
        assert refused(lambda: root.list_users()) == "InvalidClientTokenId"
        assert refused(lambda: ec2(aws_env(endpoint)).describe_vpcs()) == "AuthFailure"
        default_vpc = client("ec2").describe_vpcs()["Vpcs"][0]["VpcId"]
        assert refused(lambda: client("ec2").delete_vpc(VpcId=default_vpc)) == "AccessDenied"
        assert refused(lambda: client("iam").create_user(UserName="intruder")) == "AccessDenied"
        # The policy exactly as shipped: moto refuses its ARN-scoped creates (see as_moto_evaluates).
        # If this starts to pass, moto evaluates resources and the test should use `shipped` itself.
        assert refused(lambda: client("ec2", "dask-shipped").create_security_group(
            GroupName="probe", Description="probe")) == "AccessDenied"

        log = tmp_path / "moto.log"
        start = len(log.read_text())
        buckets = ["-e", json.dumps({"s3_read_buckets": ["data-a/raw"], "s3_write_buckets": ["s3://results-b"]})]
        provisioned = run_playbook("playbooks/provision.yml", *BASE_ARGS, "-e", "cluster_name=awsiam", "-e",
                                   "worker_count=1", *buckets, env=env, name="aws-iam-provision")
        provision_log = log.read_text()[start:]
        found = instances(env, "awsiam")
        assert sorted(found) == ["dask-awsiam-scheduler", "dask-awsiam-worker-1"]
        # Before the launch: the bucket of another region, and what reading it costs.
        assert re.search(r"S3 bucket results-b is in us-west-2, the cluster in eu-west-1: every GB the cluster reads\s+"
                         r"from it crosses regions \(about \$0\.02 per GB", provisioned.output), provisioned.output[-3000:]
        assert provisioned.output.index("TASK [provider_aws : Find where the cluster's S3 buckets are]") \
            < provisioned.output.index("TASK [provider_aws : Launch the machines")

        # make status names what the cluster's machines can reach.
        status = run_playbook("playbooks/status.yml", "-e", f"regions={REGION}", env=env, name="aws-iam-status")
        assert "S3: awsiam (eu-west-1) reads data-a/raw, results-b; writes results-b." in status.output, \
            status.output[-3000:]
        provision_log += log.read_text()[start + len(provision_log):]

        # The cluster's own role, as IAM holds it: the machines' profile, exactly the buckets asked for.
        name = f"dask-awsiam-{REGION}"
        assert {inst["IamInstanceProfile"]["Arn"] for inst in found.values()} == {
            f"arn:aws:iam::123456789012:instance-profile/dask-ec2-ansible/{name}"}
        iam = client("iam")
        role = iam.get_role(RoleName=name)["Role"]
        assert role["Path"] == "/dask-ec2-ansible/"
        # Whatever policy the role is given, it can do no more than the boundary (the shipped policy makes
        # and changes only roles with it).
        assert role["PermissionsBoundary"] == {"PermissionsBoundaryType": "PermissionsBoundaryPolicy",
                                               "PermissionsBoundaryArn": boundary}
        assert role["AssumeRolePolicyDocument"]["Statement"] == [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
        assert iam.list_role_policies(RoleName=name)["PolicyNames"] == ["s3-buckets"]
        assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
        assert iam.get_role_policy(RoleName=name, PolicyName="s3-buckets")["PolicyDocument"]["Statement"] == [
            {"Sid": "List1", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::data-a",
             "Condition": {"StringLike": {"s3:prefix": ["raw", "raw/*"]}}},
            {"Sid": "List2", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::results-b"},
            {"Sid": "Read", "Effect": "Allow", "Action": "s3:GetObject", "Resource": ["arn:aws:s3:::data-a/raw/*"]},
            {"Sid": "Write", "Effect": "Allow",
             "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"],
             "Resource": ["arn:aws:s3:::results-b/*"]}]
        # ... and as S3 enforces it, for a session of that role (what a machine's metadata service hands out).
        assert role["Arn"] == role_arn
        s3 = client("s3", aws_access_key_id=keys["AccessKeyId"], aws_secret_access_key=keys["SecretAccessKey"],
                    aws_session_token=keys["SessionToken"])
        assert s3.get_object(Bucket="data-a", Key="raw/table.csv")["Body"].read() == b"x,y\n1,2\n"
        s3.put_object(Bucket="results-b", Key="out/result.csv", Body=b"3")
        assert s3.get_object(Bucket="results-b", Key="out/result.csv")["Body"].read() == b"3"
        s3.delete_object(Bucket="results-b", Key="out/result.csv")
        assert refused(lambda: s3.put_object(Bucket="data-a", Key="raw/overwritten.csv", Body=b"no")) == "AccessDenied"
        assert refused(lambda: s3.get_object(Bucket="other-c", Key="secret.csv")) == "AccessDenied"
        assert refused(lambda: s3.delete_bucket(Bucket="data-a")) == "AccessDenied"

        # save_work=false: no machine answers on moto (see test_ubuntu_when_asked_is_canonicals_newest).
        # Teardown is not told of the buckets: it removes the role all the same (a second teardown finding
        # no role changes nothing: test_teardown_removes_everything_and_can_run_twice).
        start = len(log.read_text())
        run_playbook("teardown.yml", "-e", "provider=aws", "-e", "cluster_name=awsiam", "-e", "save_work=false",
                     env=env, name="aws-iam-teardown")
        assert leftovers(env, "awsiam") == nothing_left(env, "awsiam")
        assert not (ROOT / ".clusters" / "awsiam").exists()
        # Not one request of the playbooks was refused, not even one a module would have tolerated.
        for during in (provision_log, log.read_text()[start:]):
            assert " 403 " not in during and " 401 " not in during, during
        assert refused(lambda: client("iam").create_user(UserName="intruder")) == "AccessDenied"


def test_the_shipped_policy_makes_the_autoscalers_role_and_that_role_suffices_for_it_under_moto_iam_enforcement(
        tmp_path, monkeypatch):
    """scale_maximum above worker_count: provision.yml, as a user whose one policy is the shipped one, makes the
    scheduler's role and instance profile within the autoscaler's boundary, and teardown.yml removes them. A
    session of that role (what the scheduler's metadata service hands out) then launches, finds, names and
    terminates a worker with the autoscaler's own code. moto checks actions, not ARNs or conditions (see
    as_moto_evaluates): the role's policy, as provision.yml made it, is put back by the user with every Resource
    "*" (which the shipped policy allows); what its ARNs and conditions allow is tests/test_iam.py's."""
    from dask_ec2_ansible.autoscaler import AUTOSCALED_TAG, Autoscaler

    cluster = "awsscaleiam"
    shipped = as_moto_evaluates(json.loads((ROOT / "iam" / "dask-ec2-ansible-policy.json").read_text()))
    # 2 boundaries, 4 requests for the user, a session of the autoscaler's role.
    with moto_server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="7") as endpoint:
        root = boto3.client("iam", region_name=REGION, endpoint_url=endpoint,
                            aws_access_key_id="testing", aws_secret_access_key="testing")
        boundaries = {}
        for kind in ("machines", "autoscaler"):
            boundaries[kind] = root.create_policy(
                PolicyName=f"dask-ec2-ansible-{kind}-boundary", Path="/dask-ec2-ansible/",
                PolicyDocument=(ROOT / "iam" / f"dask-ec2-ansible-{kind}-boundary.json").read_text())["Policy"]["Arn"]
        root.create_user(UserName="dask-user")
        root.attach_user_policy(UserName="dask-user", PolicyArn=root.create_policy(
            PolicyName="dask-user", PolicyDocument=json.dumps(shipped))["Policy"]["Arn"])
        key = root.create_access_key(UserName="dask-user")["AccessKey"]
        env = aws_env(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
        name = f"dask-{cluster}-{REGION}-autoscaler"
        session = boto3.client("sts", region_name=REGION, endpoint_url=endpoint, aws_access_key_id="testing",
                               aws_secret_access_key="testing").assume_role(
            RoleArn=f"arn:aws:iam::123456789012:role/dask-ec2-ansible/{name}",
            RoleSessionName="i-0scheduler")["Credentials"]
        assert refused(lambda: root.list_users()) == "InvalidClientTokenId"

        log = tmp_path / "moto.log"
        start = len(log.read_text())
        provision(env, "-e", "worker_count=1", "-e", "scale_maximum=2", "-e", f"ami_id={NEWEST_DEBIAN13_AMD64}",
                  cluster=cluster, name="aws-scale-iam-provision")
        iam = boto3.client("iam", region_name=REGION, endpoint_url=endpoint,
                           aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        role = iam.get_role(RoleName=name)["Role"]
        assert role["Path"] == "/dask-ec2-ansible/"
        assert role["PermissionsBoundary"]["PermissionsBoundaryArn"] == boundaries["autoscaler"]
        found = instances(env, cluster)
        assert found["dask-awsscaleiam-scheduler"]["IamInstanceProfile"]["Arn"].endswith(f"/dask-ec2-ansible/{name}")
        assert "IamInstanceProfile" not in found["dask-awsscaleiam-worker-1"]
        (policy,) = iam.list_role_policies(RoleName=name)["PolicyNames"]
        document = iam.get_role_policy(RoleName=name, PolicyName=policy)["PolicyDocument"]
        iam.put_role_policy(RoleName=name, PolicyName=policy, PolicyDocument=json.dumps(as_moto_evaluates(document)))
        playbooks_log = log.read_text()[start:]

        # The autoscaler, with the role's session: what it calls to start and stop a worker.
        start = len(log.read_text())
        for variable, value in (("AWS_ACCESS_KEY_ID", session["AccessKeyId"]),
                                ("AWS_SECRET_ACCESS_KEY", session["SecretAccessKey"]),
                                ("AWS_SESSION_TOKEN", session["SessionToken"]), ("AWS_ENDPOINT_URL", endpoint),
                                ("AWS_EC2_METADATA_DISABLED", "true")):
            monkeypatch.setenv(variable, value)
        # boto3's default session keeps the credentials it found first (another test's in this process).
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
        launch = json.loads((ROOT / ".clusters" / cluster / "worker-launch.json").read_text())
        autoscaler = Autoscaler({
            "scheduler_address": "tcp://127.0.0.1:9", "tls": None, "region": REGION, "state_dir": str(tmp_path),
            "fixed_workers": ["dask-awsscaleiam-worker-1"], "maximum": 2, "initial": 1, "minimum": 1,
            "cluster_tags": launch["cluster_tags"], "instance_tags": launch["instance_tags"],
            "name_prefix": launch["name_prefix"], "subnet_ids": launch["subnet_ids"],
            "run_instances": launch["run_instances"], "user_data": "#cloud-config\n", "interval": "5s",
            "join_timeout": 600, "quota_backoff": 300, "target_duration": "3m", "wait_count": 24})
        assert autoscaler.launch(), autoscaler.last_error
        autoscaler.refresh()
        (worker,) = autoscaler.instances
        tagged = {t["Key"]: t["Value"] for t in autoscaler.instances[worker]["Tags"]}
        assert tagged[AUTOSCALED_TAG] == "true" and tagged["Name"] == f"dask-{cluster}-worker-{worker}"
        autoscaler.terminate([worker], "the test is done")
        autoscaler.refresh()
        assert autoscaler.instances == {}
        role_log = log.read_text()[start:]
        # The role's session may not do what the autoscaler does not need.
        role_iam = boto3.client("iam", region_name=REGION, endpoint_url=endpoint,
                                aws_access_key_id=session["AccessKeyId"],
                                aws_secret_access_key=session["SecretAccessKey"],
                                aws_session_token=session["SessionToken"])
        assert refused(lambda: role_iam.create_user(UserName="intruder")) == "AccessDenied"
        for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(variable)

        start = len(log.read_text())
        run_playbook("teardown.yml", "-e", "provider=aws", "-e", f"cluster_name={cluster}", "-e", "save_work=false",
                     env=env, name="aws-scale-iam-teardown")
        assert leftovers(env, cluster) == nothing_left(env, cluster)
        assert refused(lambda: iam.get_role(RoleName=name)) == "NoSuchEntity"
        assert refused(lambda: iam.get_instance_profile(InstanceProfileName=name)) == "NoSuchEntity"
        # Not one request of the playbooks or of the autoscaler was refused.
        for during in (playbooks_log, role_log, log.read_text()[start:]):
            assert " 403 " not in during and " 401 " not in during, during
