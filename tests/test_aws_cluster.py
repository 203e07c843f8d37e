"""The aws path end to end, as a user runs it, on the local EC2 emulator.

scripts/ec2-emulator: moto_server answers the EC2 API, and every instance it
reports pending or running is a real machine (a systemd container of the
local provider's base image) at the instance's private address, following
the instance's stops, starts, terminations, images and its own poweroffs.
So site.yml -e provider=aws goes all the way: the aws_ec2 inventory's
addresses and SSH user, the roles on those hosts, certificates for those
addresses, a Dask client and Jupyter at them, scale-down through a real
scheduler, idle_shutdown ending in EC2 terminations, teardown.

Machines boot through the image's own cloud-init (a NoCloud seed with the
instance's meta-data, key pair and user data), and reach instance metadata
(IMDSv2, their profile's credentials) and the API on the emulator network's
gateway, named by AWS_EC2_METADATA_SERVICE_ENDPOINT and AWS_ENDPOINT_URL.

What still differs from real EC2 (docs/tests.md, "What the tests prove"): machines
boot in seconds, not 30-60 s; the metadata service's address; no public
addresses (aws_private_network); security groups and IAM conditions are not
enforced on the traffic; instance types do not size the machines.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import warnings
from pathlib import Path

import pytest

from cluster_checks import (assert_back_with_the_notebook, assert_jupyter_wants_the_token_and_its_kernel_joins,
                            client_for, log_on_worker, logged_line, printed_connect_lines, run_in_kernel,
                            run_pasted_lines, save_notebook, wait_for_workers)
from emulator import running_emulator, wait_until
from conftest import ROOT, docker_available, extra_ca_args, run_playbook

boto3 = pytest.importorskip("boto3")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not docker_available(), reason="needs a Docker engine (make docker)"),
]

# Other names and another network (DASK_TEST_EMULATOR=..., DASK_TEST_EMULATOR_CIDR=...,
# DASK_TEST_AWS_CLUSTER=...) let two checkouts run these tests on one Docker engine at once.
EMULATOR = os.environ.get("DASK_TEST_EMULATOR", "dask-ec2-emulator-test")
# Not the one `make demo-aws` uses (10.213.0.0/20), so both can run at once.
CIDR = os.environ.get("DASK_TEST_EMULATOR_CIDR", "10.214.0.0/20")
REGION = "eu-west-1"
CLUSTER = os.environ.get("DASK_TEST_AWS_CLUSTER", "awse2e")
SCHEDULER = f"dask-{CLUSTER}-scheduler"
STATE = ROOT / ".clusters" / CLUSTER
CLUSTER_TAG = "dask-ec2-ansible:cluster"
LIVE = ("pending", "running", "stopping", "stopped")


def emulator_objects(kind: str) -> list[str]:
    """The emulator's containers (with their state), networks or images that exist."""
    if kind == "container":
        cmd = ["docker", "ps", "-a", "--filter", f"label=dask-ec2-emulator.name={EMULATOR}",
               "--format", "{{.Label \"dask-ec2-emulator.instance-id\"}} {{.State}}"]
    elif kind == "network":
        cmd = ["docker", "network", "ls", "--filter", f"name=^{EMULATOR}$", "--format", "{{.Name}}"]
    else:
        cmd = ["docker", "images", f"dask-ec2-emulator/{EMULATOR}", "--format", "{{.Repository}}:{{.Tag}}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines() if line)


def machines() -> dict[str, str]:
    """instance id -> container state ('running', 'exited', ...)."""
    return dict(line.split(" ", 1) for line in emulator_objects("container"))




@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The EC2 emulator as `make demo-aws` runs it, in the foreground; always stopped."""
    with running_emulator(tmp_path_factory.mktemp("ec2-emulator"), EMULATOR, CIDR, REGION) as emulator:
        yield emulator


def ec2(emulator):
    return boto3.client("ec2", region_name=REGION, endpoint_url=emulator["endpoint"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def instance(emulator, instance_id: str) -> dict:
    return ec2(emulator).describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def ssh(key: Path, address: str, command: str, user: str = "admin") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "ConnectTimeout=5", "-o", "BatchMode=yes", f"{user}@{address}", command],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def key_pair(emulator, tmp_path_factory):
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    ec2(emulator).import_key_pair(KeyName="emulator-test", PublicKeyMaterial=key.with_suffix(".pub").read_bytes())
    return key


def launch(emulator, image_id: str, behaviour: str = "terminate", **extra) -> dict:
    return ec2(emulator).run_instances(
        ImageId=image_id, MinCount=1, MaxCount=1, InstanceType="t3.small", KeyName="emulator-test",
        SubnetId=emulator["subnet_id"], InstanceInitiatedShutdownBehavior=behaviour, **extra)["Instances"][0]


def iam(emulator):
    return boto3.client("iam", region_name=REGION, endpoint_url=emulator["endpoint"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def instance_profile(emulator, name: str) -> str:
    """An EC2 role and its instance profile, as a user makes them; the profile's name."""
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
    client = iam(emulator)
    client.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))
    client.create_instance_profile(InstanceProfileName=name)
    client.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return name


# This machine's boto3 and what it needs, for a machine's own Python (Debian's python3-boto3 is too old to
# read AWS_ENDPOINT_URL, and would then send to AWS itself): pure Python, copied over SSH.
BOTO_PACKAGES = ("boto3", "botocore", "jmespath", "s3transfer", "dateutil", "six.py", "urllib3")
# Run on a machine as its login user, by the default credential chain: who am I, and can I see myself.
WHO_AM_I = """
import json, os, urllib.request
import boto3, botocore.exceptions
assert os.environ["AWS_ENDPOINT_URL"].startswith("http://10."), "only the emulator's API, never AWS"
base = os.environ["AWS_EC2_METADATA_SERVICE_ENDPOINT"]
token = urllib.request.urlopen(urllib.request.Request(base + "latest/api/token", method="PUT",
    headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"})).read().decode()
region = urllib.request.urlopen(urllib.request.Request(base + "latest/meta-data/placement/region",
    headers={"X-aws-ec2-metadata-token": token})).read().decode()
try:
    arn = boto3.client("sts", region_name=region).get_caller_identity()["Arn"]
    me = boto3.client("ec2", region_name=region).describe_instances(
        Filters=[{"Name": "private-ip-address", "Values": [os.environ["SSH_CONNECTION"].split()[2]]}])
    print(json.dumps({"arn": arn, "instances": [i["InstanceId"] for r in me["Reservations"] for i in r["Instances"]]}))
except botocore.exceptions.NoCredentialsError as error:
    print(json.dumps({"error": type(error).__name__}))
"""


def copy_boto3(key: Path, address: str, user: str = "admin") -> None:
    site_packages = Path(boto3.__file__).parent.parent
    pack = subprocess.Popen(["tar", "-C", str(site_packages), "--exclude=__pycache__", "-cf", "-", *BOTO_PACKAGES],
                            stdout=subprocess.PIPE)
    unpack = subprocess.run(["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                             "-o", "BatchMode=yes", f"{user}@{address}", "mkdir -p ~/boto && tar -C ~/boto -xf -"],
                            stdin=pack.stdout, capture_output=True, text=True, timeout=120)
    pack.wait()
    assert unpack.returncode == 0, unpack.stderr


def who_am_i(key: Path, address: str, user: str = "admin") -> dict:
    """The default credential chain on the machine, as its login user (not root)."""
    run = ssh(key, address, f"PYTHONPATH=~/boto python3 -c {shlex.quote(WHO_AM_I)}", user=user)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def metadata(key: Path, address: str, *paths: str, token: bool = True) -> list[str]:
    """curl on the machine: each path of its instance metadata (IMDSv2 unless token=False), status and body."""
    ask = ('t=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" "${AWS_EC2_METADATA_SERVICE_ENDPOINT}'
           'latest/api/token")' if token else "t=")
    lines = [ask] + [f'curl -s -w " %{{http_code}}\\n" -H "X-aws-ec2-metadata-token: $t" '
                     f'"${{AWS_EC2_METADATA_SERVICE_ENDPOINT}}latest/{path}" | tr "\\n" " "; echo'
                     for path in paths]
    if not token:
        lines = [line.replace('-H "X-aws-ec2-metadata-token: $t" ', "") for line in lines]
    run = ssh(key, address, "\n".join(lines))
    assert run.returncode == 0, run.stderr
    return [line.strip() for line in run.stdout.splitlines() if line.strip()]


def debian_ami(emulator) -> str:
    images = ec2(emulator).describe_images(Owners=["136693071363"], Filters=[{"Name": "name", "Values": ["debian-12-*"]}])
    return images["Images"][0]["ImageId"]


# ---- the emulator itself: an instance is a machine --------------------------------------------------------


def test_a_machine_follows_its_instance_through_stop_start_poweroff_and_terminate(emulator, key_pair):
    client = ec2(emulator)
    launched = launch(emulator, debian_ami(emulator), behaviour="stop")
    instance_id, address = launched["InstanceId"], launched["PrivateIpAddress"]
    assert "PublicIpAddress" not in launched, "the emulator's subnet gives no public address"
    # Booted, reachable at its private address, the key pair's key in Debian's default user.
    answer = wait_until(lambda: ssh(key_pair, address, "hostname -I; sudo -n true && echo sudo").stdout.split() or None,
                        60, f"SSH to {address}")
    assert answer == [address, "sudo"]

    ssh(key_pair, address, "sudo systemctl poweroff")
    wait_until(lambda: instance(emulator, instance_id)["State"]["Name"] == "stopped", 60,
               "a poweroff inside stops an instance whose shutdown behaviour is stop")
    assert machines()[instance_id] == "exited", "its disk is kept"

    client.start_instances(InstanceIds=[instance_id])
    wait_until(lambda: machines().get(instance_id) == "running", 60, "started again")
    assert wait_until(lambda: ssh(key_pair, address, "echo back").stdout.strip() or None, 60, "SSH again") == "back"

    client.stop_instances(InstanceIds=[instance_id])
    wait_until(lambda: machines().get(instance_id) == "exited", 60, "StopInstances halts the machine")

    client.terminate_instances(InstanceIds=[instance_id])
    wait_until(lambda: instance_id not in machines(), 60, "TerminateInstances removes the machine")


def test_an_image_of_a_machine_boots_a_copy_with_host_keys_of_its_own(emulator, key_pair):
    client = ec2(emulator)
    source = launch(emulator, debian_ami(emulator))
    address = source["PrivateIpAddress"]
    wait_until(lambda: ssh(key_pair, address, "sudo sh -c 'echo baked >/etc/baked'").returncode == 0, 60, "SSH")
    source_host_key = ssh(key_pair, address, "cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1]

    image_id = client.create_image(InstanceId=source["InstanceId"], Name="emulator-test-baked")["ImageId"]
    wait_until(lambda: f"dask-ec2-emulator/{EMULATOR}:{image_id}" in emulator_objects("image"), 60,
               "CreateImage commits the machine")
    copy = launch(emulator, image_id)
    try:
        out = wait_until(lambda: ssh(key_pair, copy["PrivateIpAddress"],
                                     "cat /etc/baked /etc/ssh/ssh_host_ed25519_key.pub").stdout.split() or None,
                         60, "SSH to the copy")
        assert out[0] == "baked", "the copy has what the source machine had"
        assert out[2] != source_host_key, "every machine has host keys of its own, as cloud-init makes them"
    finally:
        client.terminate_instances(InstanceIds=[source["InstanceId"], copy["InstanceId"]])
        client.deregister_image(ImageId=image_id)
    wait_until(lambda: not {source["InstanceId"], copy["InstanceId"]} & set(machines()), 60, "both removed")


CLOUD_CONFIG = """#cloud-config
write_files:
  - path: /etc/from-user-data
    content: written by cloud-init's write_files
runcmd:
  - [sh, -c, "id -un > /var/tmp/runcmd-ran-as"]
"""
SCRIPT = "#!/bin/sh\necho \"$0\" > /var/tmp/script-ran\n"


@pytest.fixture(scope="class")
def booted(emulator, key_pair):
    """Two instances launched as EC2 users launch them, IMDSv2 required: one with a #cloud-config and an
    instance profile, one with a #! script and no profile; both terminated, their machines gone, after the
    tests of the class (the cluster's teardown test expects no machine of any instance)."""
    profile = instance_profile(emulator, "emulator-test-reader")
    tokens = {"HttpTokens": "required", "HttpEndpoint": "enabled"}
    ami = debian_ami(emulator)
    config = launch(emulator, ami, UserData=CLOUD_CONFIG, MetadataOptions=tokens,
                    IamInstanceProfile={"Name": profile})
    script = launch(emulator, ami, UserData=SCRIPT, MetadataOptions=tokens)
    try:
        for launched in (config, script):
            wait_until(lambda: ssh(key_pair, launched["PrivateIpAddress"], "cloud-init status --wait >/dev/null; "
                                   "cloud-init status").stdout.strip() or None, 120, "cloud-init done")
        yield {"config": config, "script": script, "profile": profile, "key": key_pair}
    finally:
        ec2(emulator).terminate_instances(InstanceIds=[config["InstanceId"], script["InstanceId"]])
        wait_until(lambda: not {config["InstanceId"], script["InstanceId"]} & set(machines()), 60,
                   "the two machines removed")


class TestAMachineBootsAsOnEC2:
    """cloud-init, instance metadata and credentials on two instances of their own (gone before the
    cluster tests below, whose teardown expects no machine of any instance left)."""

    def test_user_data_runs_through_cloud_init_and_so_does_the_key_pair(self, booted, key_pair):
        config, script = booted["config"]["PrivateIpAddress"], booted["script"]["PrivateIpAddress"]
        for address in (config, script):
            status = ssh(key_pair, address, "cloud-init status --long").stdout
            assert re.search(r"^status: done$", status, re.M), status
            assert "DataSourceNoCloud" in status, status
            # The key reached the default user through cloud-init (its ssh module), whose log says it wrote it.
            assert re.search(r"Writing to /home/admin/\.ssh/authorized_keys",
                             ssh(key_pair, address, "sudo cat /var/log/cloud-init.log").stdout), "cloud-init wrote the key"
        out = ssh(key_pair, config, "cat /etc/from-user-data; echo; cat /var/tmp/runcmd-ran-as; ls /var/tmp").stdout
        assert out.splitlines()[:2] == ["written by cloud-init's write_files", "root"], out
        assert "script-ran" not in out
        ran = ssh(key_pair, script, "cat /var/tmp/script-ran; test -e /etc/from-user-data || echo no-file").stdout.split()
        assert ran[0].startswith("/var/lib/cloud/instance"), "cloud-init ran the script from its instance directory"
        assert ran[1] == "no-file"


    def test_each_machine_gets_its_own_metadata_with_a_token_and_none_without(self, booted):
        key = booted["key"]
        answers = {}
        for name in ("config", "script"):
            launched = booted[name]
            address = launched["PrivateIpAddress"]
            got = metadata(key, address, "meta-data/instance-id", "meta-data/placement/availability-zone",
                           "meta-data/placement/region", "meta-data/local-ipv4", "meta-data/mac")
            assert got == [f"{launched['InstanceId']} 200", f"{REGION}a 200", f"{REGION} 200", f"{address} 200",
                           f"{launched['NetworkInterfaces'][0]['MacAddress']} 200"], got
            mac = ssh(key, address, "cat /sys/class/net/eth0/address").stdout.strip()
            assert mac == launched["NetworkInterfaces"][0]["MacAddress"], "the machine has its interface's address"
            # Launched with HttpTokens=required: IMDSv1 (no token) is refused, as EC2 refuses it.
            assert metadata(key, address, "meta-data/instance-id", token=False) == ["401"]
            answers[name] = got
        assert answers["config"] != answers["script"]


    def test_a_machine_with_an_instance_profile_has_its_roles_credentials_and_one_without_has_none(self, booted):
        key, config, script = booted["key"], booted["config"], booted["script"]
        info = metadata(key, config["PrivateIpAddress"], "meta-data/iam/info", "meta-data/iam/security-credentials/")
        assert f'"InstanceProfileArn": "arn:aws:iam::123456789012:instance-profile/{booted["profile"]}"' in info[0]
        assert info[1] == f"{booted['profile']} 200"
        assert metadata(key, script["PrivateIpAddress"], "meta-data/iam/security-credentials/") == ["404"]
        for launched in (config, script):
            copy_boto3(key, launched["PrivateIpAddress"])
        mine = who_am_i(key, config["PrivateIpAddress"])
        assert mine == {"arn": f"arn:aws:sts::123456789012:assumed-role/{booted['profile']}/{config['InstanceId']}",
                        "instances": [config["InstanceId"]]}, "the role's session, and the API reached from inside"
        assert who_am_i(key, script["PrivateIpAddress"]) == {"error": "NoCredentialsError"}


    def test_the_machines_reach_nothing_else_of_this_machine(self, booted, emulator):
        """Only the metadata service and the API are open to the machines on the gateway: a port this test opens
        there is refused to them."""
        with socket.create_server((emulator["gateway"], 0)) as listener:
            port = listener.getsockname()[1]

            def accept():
                # A connection that did arrive is accepted (and the assertion below fails); the listener
                # closes with the block, which ends accept() with an error that is no finding.
                with contextlib.suppress(OSError):
                    listener.accept()

            threading.Thread(target=accept, daemon=True).start()
            probe = ssh(booted["key"], booted["script"]["PrivateIpAddress"],
                        f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{emulator['gateway']}:{port}/; echo \" $?\"; "
                        f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' {emulator['imds_endpoint']}/latest/; echo; "
                        f"curl -s -m 5 -o /dev/null -w '%{{http_code}}' {emulator['inside_endpoint']}/; echo")
        refused, imds, api = probe.stdout.splitlines()
        assert refused == "000 7", f"connection refused expected: {refused}"
        assert imds == "401", "the metadata service answers (and wants its token)"
        assert api != "000", "the API answers"


# ---- site.yml -e provider=aws on the emulator ------------------------------------------------------------


# The cluster's data on the emulator's S3 (its own role reads and writes them, no keys on the machines).
BUCKETS = {"s3_read_buckets": ["data-a"], "s3_write_buckets": ["results-b/out"]}


def site_args(emulator, *extra: str) -> list[str]:
    return ["-e", f"@{emulator['state'] / 'vars.yml'}", "-e", f"cluster_name={CLUSTER}", "-e", json.dumps(BUCKETS),
            *extra_ca_args(), *extra]


def site(emulator, *extra: str, name: str):
    return run_playbook("site.yml", *site_args(emulator, *extra), env=emulator["env"], name=name)


def teardown(emulator, name: str):
    return run_playbook("teardown.yml", "-e", f"@{emulator['state'] / 'vars.yml'}", "-e", f"cluster_name={CLUSTER}",
                        env=emulator["env"], name=name)


def cluster_instances(emulator, states=LIVE) -> dict[str, dict]:
    """{Name tag: instance} of the cluster's instances in these states."""
    pages = ec2(emulator).get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [CLUSTER]},
                 {"Name": "instance-state-name", "Values": list(states)}])
    found = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    return {{t["Key"]: t["Value"] for t in i["Tags"]}["Name"]: i for i in found}


def s3(emulator):
    return boto3.client("s3", region_name=REGION, endpoint_url=emulator["endpoint"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


# A table and a raster-like binary (a TIFF header, then bytes) the workers read from data-a.
TABLE = {"x": list(range(100)), "y": [i % 7 for i in range(100)]}
RASTER = b"II*\x00" + bytes(range(256)) * 64


@pytest.fixture(scope="module")
def cluster(emulator):
    import io

    import pandas as pd

    client = s3(emulator)
    for bucket in ("data-a", "results-b", "other-c"):
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    table = io.BytesIO()
    pd.DataFrame(TABLE).to_parquet(table)
    client.put_object(Bucket="data-a", Key="tables/table.parquet", Body=table.getvalue())
    client.put_object(Bucket="data-a", Key="rasters/tile.tif", Body=RASTER)
    first = site(emulator, "-e", "worker_count=2", name="aws-site-first")
    info = json.loads((STATE / "cluster.json").read_text())
    try:
        yield {"emulator": emulator, "first": first, "info": info, "profile": f"dask-{CLUSTER}-{REGION}"}
    finally:
        if emulator["process"].poll() is None:  # (the last test stops it, after a teardown of its own)
            teardown(emulator, name="aws-site-teardown-after")


def test_site_configures_every_machine_at_its_private_address(cluster):
    recap = cluster["first"].recap
    names = [SCHEDULER, f"dask-{CLUSTER}-worker-1", f"dask-{CLUSTER}-worker-2"]
    assert set(recap) == {"localhost", *names}
    assert all(host["failed"] == 0 and host["unreachable"] == 0 for host in recap.values())
    assert all(recap[name]["changed"] > 0 for name in names)
    found = cluster_instances(cluster["emulator"])
    assert sorted(found) == sorted(names)
    running = machines()
    for name, inst in found.items():
        assert inst["State"]["Name"] == "running", name
        assert "PublicIpAddress" not in inst, f"{name}: aws_private_network gives no public address"
        assert running[inst["InstanceId"]] == "running", name


def test_the_workers_and_the_kernel_use_the_buckets_with_the_clusters_own_role_and_no_keys(cluster):
    """s3_read_buckets / s3_write_buckets end to end: every instance carries the cluster's own profile, and on
    every worker a Dask task (a hardened systemd unit, no key anywhere in its environment) reads a Parquet table
    and a raster-like binary from data-a with s3fs, from its role's credentials, and writes its result to
    results-b; a kernel of Jupyter reads data-a too. (What the role refuses is proven where IAM is enforced:
    test_aws.py, test_iam_policy_suffices_under_moto_iam_enforcement.)"""
    emulator = cluster["emulator"]
    found = cluster_instances(emulator)
    assert {inst["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for inst in found.values()} == {cluster["profile"]}

    def read_and_write(dask_worker):
        import os

        import botocore.session
        import pandas as pd
        import s3fs

        keys = sorted(k for k in os.environ if k.startswith("AWS_") and ("KEY" in k or "TOKEN" in k))
        method = botocore.session.get_session().get_credentials().method
        table = pd.read_parquet("s3://data-a/tables/table.parquet")
        raster = s3fs.S3FileSystem().cat("data-a/rasters/tile.tif")
        name = dask_worker.name
        pd.DataFrame({"worker": [name], "x": [int(table.x.sum())], "raster": [len(raster)]}).to_parquet(
            f"s3://results-b/out/{name}.parquet")
        return keys, method, int(table.x.sum()), raster[:4], len(raster)

    client = client_for(cluster["info"])
    try:
        answers = client.run(read_and_write)
    finally:
        client.close()
    assert len(answers) == 2
    for keys, method, total, header, size in answers.values():
        assert keys == [], f"no keys in the worker's environment: {keys}"
        assert method == "iam-role", "credentials from the instance's role, through the metadata service"
        assert (total, header, size) == (sum(TABLE["x"]), RASTER[:4], len(RASTER))
    written = s3(emulator).list_objects_v2(Bucket="results-b", Prefix="out/dask-")["Contents"]
    assert sorted(o["Key"] for o in written) == [f"out/dask-{CLUSTER}-worker-{i}.parquet" for i in (1, 2)]

    # A notebook's way: the kernel plans, the workers read and write (dd.read_parquet, to_parquet on s3://).
    out = run_in_kernel(cluster["info"], "\n".join([
        "import dask.dataframe as dd, distributed",
        "client = distributed.Client(timeout=30)",
        "df = dd.read_parquet('s3://data-a/tables/')",
        "print('SUM', int(df.x.sum().compute()))",
        "df.groupby('y').x.sum().to_frame().to_parquet('s3://results-b/out/by-y/')",
    ]))
    assert out.strip() == f"SUM {sum(TABLE['x'])}", out
    by_y = s3(emulator).list_objects_v2(Bucket="results-b", Prefix="out/by-y/")["Contents"]
    assert by_y and all(o["Key"].endswith(".parquet") for o in by_y), by_y


def test_cluster_json_names_the_private_addresses_and_the_endpoint(cluster):
    info, found = cluster["info"], cluster_instances(cluster["emulator"])
    assert info["provider"] == "aws"
    assert info["aws_endpoint_url"] == cluster["emulator"]["endpoint"]
    assert info["ssh_user"] == "admin", "Debian's default user, from the instance's ssh-user tag"
    assert info["nodes"] == {name: inst["PrivateIpAddress"] for name, inst in found.items()}
    assert info["scheduler_address"] == f"tls://{found[SCHEDULER]['PrivateIpAddress']}:8786"
    assert info["jupyter_url"] == f"https://{found[SCHEDULER]['PrivateIpAddress']}:8888/lab"


def test_a_client_from_cluster_json_computes_on_every_worker(cluster):
    import dask.datasets

    client = client_for(cluster["info"])
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert {w["name"] for w in workers.values()} == {f"dask-{CLUSTER}-worker-{i}" for i in (1, 2)}
        assert {w["host"] for w in workers.values()} == {cluster["info"]["nodes"][f"dask-{CLUSTER}-worker-{i}"]
                                                       for i in (1, 2)}
        df = dask.datasets.timeseries(start="2000-01-01", end="2000-01-08")
        assert abs(df.x.mean().compute()) < 0.1
        assert len(client.run(lambda: 1)) == 2
    finally:
        client.close()


def test_the_cluster_object_attaches_from_cluster_json_and_keeps_the_fixed_size_with_a_warning(cluster):
    """On aws, cluster.scale(n) of a notebook written for a cluster that scales warns and keeps the size
    (worker_count), so the notebook goes on; the docker provider's refusal is tested in test_cluster.py."""
    from dask_ec2_ansible import Cluster, ScalingWarning

    assert cluster["info"]["scaling"]["provider"] == "aws"
    with Cluster.from_file(STATE / "cluster.json") as attached:
        assert attached.name == CLUSTER and len(attached.scheduler_info["workers"]) == 2
        with pytest.warns(ScalingWarning, match=r"fixed size of 2 \(worker_count\).*-e worker_count=N"):
            attached.scale(10)
        with pytest.warns(ScalingWarning, match="fixed size"):
            assert attached.adapt(minimum=0, maximum=4) is None
        with warnings.catch_warnings():
            warnings.simplefilter("error", ScalingWarning)
            attached.scale(2)  # the size it has: nothing to say
        assert len(attached.scheduler_info["workers"]) == 2


def test_the_printed_connect_lines_pasted_into_python_compute_on_the_cluster(cluster, tmp_path):
    pasted = printed_connect_lines(cluster["first"].output)
    assert pasted[-1].startswith(f'client = Client("{cluster["info"]["scheduler_address"]}", '), pasted
    run_pasted_lines(pasted, 2, cwd=tmp_path)
    assert (STATE / "README.txt").read_text().splitlines()[0] \
        == f"Cluster '{CLUSTER}' is ready: 2 workers, Dask {cluster['info']['dask_version']}."


def test_jupyter_needs_the_token_and_its_kernel_joins_the_cluster(cluster):
    assert_jupyter_wants_the_token_and_its_kernel_joins(cluster["info"], workers=2)


def test_a_second_run_changes_nothing(cluster):
    again = site(cluster["emulator"], "-e", "worker_count=2", name="aws-site-second")
    assert again.changed == 0, again.changed_tasks()
    # Every role found its stamp matching on every machine.
    assert f"Configured: none; skipped, their stamps match this run's inputs: {SCHEDULER}, " in again.output, \
        again.output[-3000:]


def test_sync_run_and_ssh_work_on_the_aws_path(cluster, tmp_path):
    """The verbs of a researcher's day (docs/working.md) through the aws_ec2 inventory and
    cluster.json of an aws cluster: the same playbooks and script the local provider's tests prove in depth."""
    emulator = cluster["emulator"]
    args = ["-e", f"@{emulator['state'] / 'vars.yml'}", "-e", f"cluster_name={CLUSTER}", "-e", f"save_dir={tmp_path}"]
    data = tmp_path / "data"
    (data / "nested").mkdir(parents=True)
    (data / "nested" / "table.csv").write_text("x,y\n1,2\n")
    (data / "blob.bin").write_bytes(os.urandom(3 << 20))
    run_playbook("playbooks/sync.yml", *args, "-e", f"up={data}", env=emulator["env"], name="aws-sync-up")
    run_playbook("playbooks/sync.yml", *args, "-e", "down=data", env=emulator["env"], name="aws-sync-down")
    back = tmp_path / CLUSTER / "data"
    assert {p.relative_to(back): p.read_bytes() for p in back.rglob("*") if p.is_file()} == {
        p.relative_to(data): p.read_bytes() for p in data.rglob("*") if p.is_file()}

    script = tmp_path / "compute.py"
    script.write_text("from distributed import Client\n"
                      "client = Client(timeout=30)\n"
                      "total = client.submit(sum, range(101)).result()\n"
                      "print('RESULT', total)\n"
                      "open('out.txt', 'w').write(str(total))\n")
    run = run_playbook("playbooks/run.yml", *args, "-e", f"script={script}", env=emulator["env"], name="aws-run")
    assert "RESULT 5050" in run.output
    (out,) = (tmp_path / CLUSTER / "runs").glob("*/out.txt")
    assert out.read_text() == "5050"

    ssh = subprocess.run(["make", "ssh", f"CLUSTER={CLUSTER}", "NODE=worker-1", "CMD=hostname"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert ssh.returncode == 0, ssh.stderr
    # EC2's host name for the instance's private address (the emulator names its machines so).
    worker = cluster_instances(emulator)[f"dask-{CLUSTER}-worker-1"]
    assert ssh.stdout.strip() == "ip-" + worker["PrivateIpAddress"].replace(".", "-")


def test_logs_and_ssh_config_work_on_the_aws_path(cluster, tmp_path):
    """make logs shows what a worker logged, prefixed by machine and service, and ssh -F with the cluster's
    ssh_config (written by site.yml, again by make ssh-config through the aws inventory) reaches each machine."""
    emulator, info = cluster["emulator"], cluster["info"]
    marker = f"issue-26 marker on aws {os.urandom(8).hex()}"
    log_on_worker(info, f"dask-{CLUSTER}-worker-1", marker)
    line = logged_line(CLUSTER, marker, "NODE=worker-1", "SERVICE=worker", env=emulator["env"])
    assert re.match(r"worker-1 worker +\| \S+Z .*WARNING", line), line
    config = STATE / "ssh_config"
    assert config.is_file(), "site.yml writes it"
    env = dict(emulator["env"], HOME=str(tmp_path))
    run = subprocess.run(["make", "ssh-config", f"CLUSTER={CLUSTER}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    assert f"\nInclude {config}\n" in run.stdout and not (tmp_path / ".ssh").exists()
    for alias in (f"{CLUSTER}-scheduler", f"{CLUSTER}-worker-1", f"{CLUSTER}-worker-2"):
        ssh = subprocess.run(["ssh", "-F", str(config), alias, "true"], capture_output=True, text=True, timeout=60)
        assert ssh.returncode == 0, f"{alias}: {ssh.stderr}"


def test_scale_up_then_down_retires_through_the_scheduler_without_losing_data(cluster):
    import numpy as np

    emulator, info = cluster["emulator"], cluster["info"]
    up = site(emulator, "-e", "worker_count=3", name="aws-site-scale-up")
    # Only the new machine was configured; the others' stamps matched.
    assert (f"Configured: dask-{CLUSTER}-worker-3; skipped, their stamps match this run's inputs: "
            f"{SCHEDULER}, dask-{CLUSTER}-worker-1, dask-{CLUSTER}-worker-2") in up.output, up.output[-3000:]
    client = client_for(info)
    try:
        wait_for_workers(client, 3, timeout=60)
        blocks = [np.full(1000, i, dtype="int64") for i in range(60)]
        futures = client.scatter(blocks)
        holders = {addr for addrs in client.who_has(futures).values() for addr in addrs}
        assert len(holders) == 3, "the data should start out on every worker"
        before = cluster_instances(emulator)

        down = site(emulator, "-e", "worker_count=1", name="aws-site-scale-down")
        retire = down.output.split(f"Retire the workers: dask-{CLUSTER}-worker-2, dask-{CLUSTER}-worker-3]", 1)
        assert len(retire) == 2, "the scheduler was asked to retire the two highest-numbered workers"
        result = retire[1].split("\nTASK [", 1)[0].split("\nPLAY [", 1)[0]
        assert f"changed: [localhost -> {SCHEDULER}(" in result, "retiring ran on the scheduler (not skipped): " + result

        after = cluster_instances(emulator)
        assert sorted(after) == [SCHEDULER, f"dask-{CLUSTER}-worker-1"]
        gone = {before[f"dask-{CLUSTER}-worker-{i}"]["InstanceId"] for i in (2, 3)}
        assert {instance(emulator, i)["State"]["Name"] for i in gone} == {"terminated"}
        wait_until(lambda: not gone & set(machines()), 60, "their machines removed")
        wait_for_workers(client, 1, timeout=60)
        assert [int(b[0]) for b in client.gather(futures)] == list(range(60))
    finally:
        client.close()


def test_idle_shutdown_stops_the_scheduler_terminates_the_workers_and_site_brings_the_notebooks_back(cluster):
    """The machines power themselves off; EC2 then shows each instance as its
    InstanceInitiatedShutdownBehavior says: the scheduler stopped (its volume,
    with the notebooks, kept), the workers terminated. site.yml starts the
    scheduler again, with its notebooks, and launches new workers."""
    emulator = cluster["emulator"]
    site(emulator, "-e", "worker_count=1", "-e", "idle_shutdown=40s", name="aws-site-idle")
    info = json.loads((STATE / "cluster.json").read_text())
    notebook = save_notebook(info, "kept.ipynb", "print('written before the cluster went idle')")
    found = cluster_instances(emulator)
    behaviour = {name: ec2(emulator).describe_instance_attribute(
        InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
    )["InstanceInitiatedShutdownBehavior"]["Value"] for name, inst in found.items()}
    assert behaviour == {SCHEDULER: "stop", f"dask-{CLUSTER}-worker-1": "terminate"}
    expected = {SCHEDULER: "stopped", f"dask-{CLUSTER}-worker-1": "terminated"}

    def final():
        states = {name: instance(emulator, inst["InstanceId"])["State"]["Name"] for name, inst in found.items()}
        return states if states == expected else None

    wait_until(final, 300, f"every idle machine powered off and its instance {expected}", interval=2)
    worker_id = found[f"dask-{CLUSTER}-worker-1"]["InstanceId"]
    wait_until(lambda: worker_id not in machines(), 60, "the terminated worker's machine removed")
    assert machines()[found[SCHEDULER]["InstanceId"]] == "exited", "the stopped scheduler's machine is kept, halted"

    again = site(emulator, "-e", "worker_count=1", name="aws-site-after-idle")
    assert f"{SCHEDULER}: " in again.output and "started again" in again.output
    now = cluster_instances(emulator, states=("running",))
    assert now[SCHEDULER]["InstanceId"] == found[SCHEDULER]["InstanceId"], "the same scheduler, started again"
    assert now[f"dask-{CLUSTER}-worker-1"]["InstanceId"] != worker_id, "a new worker"
    info = json.loads((STATE / "cluster.json").read_text())
    assert_back_with_the_notebook(info, "kept.ipynb", notebook, workers=1)


def test_teardown_of_a_stopped_scheduler_saves_its_notebooks_then_leaves_nothing_and_can_run_twice(cluster):
    emulator = cluster["emulator"]
    scheduler = cluster_instances(emulator)[SCHEDULER]["InstanceId"]
    ec2(emulator).stop_instances(InstanceIds=[scheduler])
    wait_until(lambda: instance(emulator, scheduler)["State"]["Name"] == "stopped", 120, "the scheduler stopped")
    run = teardown(emulator, name="aws-site-teardown")
    saved = re.search(rf"Saved the notebook directory of {SCHEDULER} into (\S+)\.", run.output)
    assert saved, run.output[-3000:]
    assert (Path(saved[1]) / "kept.ipynb").is_file(), "the notebook written before idle_shutdown"
    logs = Path(saved[1]) / "logs"
    assert f"Saved the journals of {SCHEDULER}, dask-{CLUSTER}-worker-1 into {logs}." in run.output, run.output[-3000:]
    assert "Scheduler at" in (logs / SCHEDULER / "dask-scheduler.log").read_text()
    assert (logs / f"dask-{CLUSTER}-worker-1" / "dask-worker.log").is_file()
    client, by_cluster = ec2(emulator), [{"Name": f"tag:{CLUSTER_TAG}", "Values": [CLUSTER]}]
    assert cluster_instances(emulator) == {}
    assert client.describe_security_groups(Filters=by_cluster)["SecurityGroups"] == []
    assert client.describe_key_pairs(Filters=by_cluster)["KeyPairs"] == []
    assert [t for t in client.describe_launch_templates()["LaunchTemplates"]
            if t["LaunchTemplateName"].startswith(f"dask-{CLUSTER}-")] == []
    assert client.describe_volumes(Filters=by_cluster)["Volumes"] == []
    # The cluster's own role and profile (s3_*_buckets) too; the buckets and their data are the user's: kept.
    # (moto lists every profile whatever the PathPrefix: the path is checked here)
    assert [r for r in iam(emulator).list_roles()["Roles"] if r["Path"] == "/dask-ec2-ansible/"] == []
    assert [p for p in iam(emulator).list_instance_profiles()["InstanceProfiles"]
            if p["Path"] == "/dask-ec2-ansible/"] == []
    assert len(s3(emulator).list_objects_v2(Bucket="results-b", Prefix="out/dask-")["Contents"]) == 2
    # (the emulator removes a terminated instance's machine within a second or two)
    wait_until(lambda: machines() == {}, 60, "no machine of any instance left")
    assert not STATE.exists()
    again = teardown(emulator, name="aws-site-teardown-again")
    assert again.changed == 0, again.changed_tasks()


def test_stopping_the_emulator_leaves_nothing(emulator):
    endpoint_port = int(emulator["endpoint"].rsplit(":", 1)[1])
    emulator["process"].send_signal(signal.SIGTERM)
    emulator["process"].wait(timeout=120)
    assert emulator_objects("container") == []
    assert emulator_objects("network") == []
    assert emulator_objects("image") == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", endpoint_port), timeout=2).close()
