"""bake.yml on the aws path, on the local EC2 emulator (scripts/ec2-emulator):
the machine is saved with amazon.aws.ec2_ami (CreateImage, which the emulator
turns into a commit of the instance's machine), the AMI is tagged with what it
holds, and site.yml -e ami_id=... launches a cluster from it that installs
nothing and computes; an AMI baked for other settings is refused before any
instance is launched.

Its own emulator (name and network), so that it runs beside the other
emulator tests and `make demo-aws`."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml

from cluster_checks import INSTALL_TASKS, assert_the_image_stamps_skipped_the_installs, client_for, run_in_kernel, task_results
from emulator import running_emulator
from conftest import ROOT, docker_available, extra_ca_args, run_playbook

boto3 = pytest.importorskip("boto3")

pytestmark = [
    pytest.mark.cluster,
    # make test-slow: make test must stay within CI's time.
    pytest.mark.slow,
    pytest.mark.skipif(not docker_available(), reason="needs a Docker engine (make docker)"),
]

EMULATOR = "dask-ec2-emulator-bake-test"
# Neither make demo-aws's (10.213.0.0/20) nor tests/test_aws_cluster.py's (10.214.0.0/20).
CIDR = "10.216.0.0/20"
REGION = "eu-west-1"
CLUSTER = "bakeaws"
REFUSED = "bakeawsbad"
CLUSTER_TAG = "dask-ec2-ansible:cluster"
MACHINES = [f"dask-{CLUSTER}-scheduler", f"dask-{CLUSTER}-worker-1", f"dask-{CLUSTER}-worker-2"]




def emulator_images() -> list[str]:
    out = subprocess.run(["docker", "images", f"dask-ec2-emulator/{EMULATOR}", "--format", "{{.Tag}}"],
                         capture_output=True, text=True, check=True).stdout
    return out.split()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with running_emulator(tmp_path_factory.mktemp("ec2-emulator-bake"), EMULATOR, CIDR, REGION) as emulator:
        yield emulator


def ec2(emulator):
    return boto3.client("ec2", region_name=REGION, endpoint_url=emulator["endpoint"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def args(emulator, *extra: str) -> list[str]:
    return ["-e", f"@{emulator['state'] / 'vars.yml'}", *extra_ca_args(), *extra]


def live_instances(emulator, cluster: str) -> list[dict]:
    pages = ec2(emulator).get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


@pytest.fixture(scope="module")
def baked(emulator):
    run = run_playbook("bake.yml", *args(emulator), env=emulator["env"], name="bake-aws")
    found = re.search(r"Baked (ami-[0-9a-f]+):", run.output)
    assert found, run.output[-3000:]
    image_id = found.group(1)
    image = ec2(emulator).describe_images(ImageIds=[image_id])["Images"][0]
    return {"run": run, "image_id": image_id, "tags": {t["Key"]: t["Value"] for t in image.get("Tags", [])}}


@pytest.fixture(scope="module")
def cluster(emulator, baked):
    try:
        first = run_playbook("site.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}", "-e", "worker_count=2",
                                              "-e", f"ami_id={baked['image_id']}"),
                             env=emulator["env"], name="bake-aws-site-first")
        yield {"first": first, "info": json.loads((ROOT / ".clusters" / CLUSTER / "cluster.json").read_text())}
    finally:
        run_playbook("teardown.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}"), env=emulator["env"],
                     name="bake-aws-teardown")


def test_the_ami_is_tagged_with_what_it_holds_and_the_bake_machine_is_gone(emulator, baked):
    tags = baked["tags"]
    os_family = yaml.safe_load((emulator["state"] / "vars.yml").read_text())["os_family"]
    assert tags["dask-ec2-ansible:image:os-family"] == os_family
    assert re.fullmatch(r"[0-9a-f]{12}", tags["dask-ec2-ansible:image:lock-hash"])
    assert tags["dask-ec2-ansible:image:dask-version"]
    assert tags["dask-ec2-ansible:created-by"] == "dask-ec2-ansible"
    assert CLUSTER_TAG not in tags, "the AMI is no resource of a cluster: teardown leaves it"
    assert baked["image_id"] in emulator_images(), "CreateImage saved the bake machine"
    bake_name = f"bake-{tags['dask-ec2-ansible:image:lock-hash'][:8]}-{tags['dask-ec2-ansible:image:os-family']}"
    assert live_instances(emulator, bake_name) == []
    assert ec2(emulator).describe_security_groups(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [bake_name]}])["SecurityGroups"] == []
    assert not (ROOT / ".clusters" / bake_name).exists()


def test_a_cluster_from_the_ami_installs_nothing_and_computes(emulator, baked, cluster):
    first = cluster["first"]
    assert set(first.recap) == {"localhost", *MACHINES}
    assert {i["ImageId"] for i in live_instances(emulator, CLUSTER)} == {baked["image_id"]}
    for task in INSTALL_TASKS:
        results = task_results(first.output, task)
        assert not [line for line in results if line.startswith("changed")], f"{task}: {results}"
    # The image's stamps matched on every machine: the installs did not even run.
    assert_the_image_stamps_skipped_the_installs(first.output, MACHINES)
    client = client_for(cluster["info"])
    try:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2
        assert client.submit(sum, range(101)).result() == 5050
    finally:
        client.close()
    out = run_in_kernel(cluster["info"], "import distributed\nclient = distributed.Client(timeout=30)\n"
                                         "print(len(client.scheduler_info(n_workers=-1)['workers']))")
    assert out.strip() == "2"


def test_an_ami_baked_for_other_settings_is_refused_before_any_launch(emulator, baked):
    run = run_playbook("site.yml", *args(emulator, "-e", f"cluster_name={REFUSED}", "-e", f"ami_id={baked['image_id']}",
                                         "-e", '{"extra_python_packages": ["six"]}'),
                       env=emulator["env"], check=False, name="bake-aws-refused")
    assert run.returncode != 0
    assert f"The image {baked['image_id']} was baked for other settings than this cluster's" in run.output
    assert live_instances(emulator, REFUSED) == []
    assert not (ROOT / ".clusters" / REFUSED).exists()
