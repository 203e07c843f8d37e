"""The autoscaler's decisions, its EC2 calls and the workers' enrollment (dask_ec2_ansible/autoscaler.py),
against moto_server and a real Dask scheduler in this process: the size asked by Cluster.scale reaches it
through the scheduler, it launches only what is missing and finds its launches again after a restart (from
EC2's tags, not memory), scales down through retire_workers without losing a result, terminates what never
joins, moves on from a zone without capacity, backs off on a quota, and signs a certificate only for the
instance it launched, once, asked from that instance's address.

Not here: the service on a machine (its unit, its instance profile, cloud-init booting a worker): that
wiring is not built yet (docs/scaling.md)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
from distributed import Client, Scheduler, Worker  # noqa: E402

from dask_ec2_ansible import Cluster, ScalingWarning  # noqa: E402
from dask_ec2_ansible.autoscaler import AUTOSCALED_TAG, LAUNCH_TAG, Autoscaler  # noqa: E402
from ec2_faults import EC2FaultProxy  # noqa: E402
from test_aws import AMIS, REGION, moto_server  # noqa: E402

CLUSTER_TAGS = {"dask-ec2-ansible:cluster": "scaletest", "dask-ec2-ansible:created-by": "dask-ec2-ansible"}
FIXED = "dask-scaletest-worker-1"
LIMITS = {"provider": "aws", "workers": 1, "minimum": 1, "maximum": 3, "adaptive": False, "autoscaler": True}


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto-autoscaler")) as endpoint:
        saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                "AWS_EC2_METADATA_DISABLED", "AWS_PROFILE")}
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_EC2_METADATA_DISABLED="true")
        os.environ.pop("AWS_PROFILE", None)
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
        subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.77.{i}.0/24", AvailabilityZone=f"{REGION}{zone}")
                   ["Subnet"]["SubnetId"] for i, zone in ((1, "a"), (2, "b"))]
        group = ec2.create_security_group(GroupName="scaletest", Description="t", VpcId=vpc)["GroupId"]
        try:
            yield {"endpoint": endpoint, "ec2": ec2, "subnets": subnets, "group": group}
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def issuing(tmp_path_factory):
    """The autoscaler's issuing CA (site.yml would make it; here openssl)."""
    work = tmp_path_factory.mktemp("issuing")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(work / "issuing.key"), "-out", str(work / "issuing.pem"), "-days", "30",
                    "-subj", "/CN=scaletest issuing CA", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True, capture_output=True)
    return {"cert_file": str(work / "issuing.pem"), "key_file": str(work / "issuing.key")}


@pytest.fixture
def make_config(moto, issuing, tmp_path):
    def make(scheduler_address: str, **changes):
        config = {
            "scheduler_address": scheduler_address, "tls": None, "region": REGION, "state_dir": str(tmp_path),
            "fixed_workers": [FIXED], "maximum": 3, "initial": 1,
            "cluster_tags": CLUSTER_TAGS, "instance_tags": {"dask-ec2-ansible:ssh-user": "admin"},
            "name_prefix": "dask-scaletest-worker", "subnet_ids": moto["subnets"],
            "run_instances": {"ImageId": AMIS[0]["ami_id"], "InstanceType": "m7i.large",
                              "SecurityGroupIds": [moto["group"]], "InstanceInitiatedShutdownBehavior": "terminate",
                              "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"}},
            "user_data": "#cloud-config\nwrite_files:\n  - path: /etc/dask-ec2-ansible/worker.json\n"
                         "    content: '{\"token\": \"@ENROLL_TOKEN@\"}'\n",
            "interval": 0.1, "join_timeout": 600, "quota_backoff": 300, "target_duration": "3m", "wait_count": 3,
            "issuing": issuing, "certificate_days": 30, "enroll_port": 0,
        }
        config.update(changes)
        return config
    return make


def live(moto) -> list[dict]:
    pages = moto["ec2"].get_paginator("describe_instances").paginate(Filters=[
        {"Name": "tag:dask-ec2-ansible:cluster", "Values": ["scaletest"]},
        {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


@pytest.fixture(autouse=True)
def no_instances_left(moto):
    yield
    ids = [i["InstanceId"] for i in live(moto)]
    if ids:
        moto["ec2"].terminate_instances(InstanceIds=ids)


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


@contextlib.asynccontextmanager
async def scheduler_with_one_fixed_worker():
    async with Scheduler(dashboard_address=":0", port=0) as scheduler:
        async with Worker(scheduler.address, name=FIXED, nthreads=1) as worker:
            cluster = await Cluster(scheduler.address, scaling=LIMITS, name="scaletest", asynchronous=True)
            try:
                yield scheduler, worker, cluster
            finally:
                await cluster._close()


async def scaled_once(make_config, n: int) -> Autoscaler:
    """An autoscaler's first decision after cluster.scale(n) (a scheduler and its fixed worker in this process)."""
    async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
        autoscaler = Autoscaler(make_config(scheduler.address))
        await cluster.scale(n)
        await autoscaler.tick()
        return autoscaler


@contextlib.contextmanager
def faults(moto):
    """The fault proxy between the autoscaler's boto3 and moto (AWS_ENDPOINT_URL points at it meanwhile)."""
    with EC2FaultProxy(moto["endpoint"]) as proxy:
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        try:
            yield proxy
        finally:
            os.environ["AWS_ENDPOINT_URL"] = moto["endpoint"]


def test_scale_up_launches_only_the_missing_workers_tagged_and_a_restart_launches_none(moto, make_config):
    async def scenario():
        async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
            config = make_config(scheduler.address)
            with pytest.warns(ScalingWarning, match="scale_maximum is 3"):
                await cluster.scale(10)
            autoscaler = Autoscaler(config)
            await autoscaler.tick()
            await autoscaler.tick()   # the two in flight count: nothing more
            # A restarted service: its state comes from EC2 (and the launches it noted), not from memory.
            again = Autoscaler(config)
            await again.tick()
            status = await cluster.scheduler_comm.get_metadata(keys=["dask-ec2-ansible", "autoscaler"])
            return status

    status = asyncio.run(scenario())
    instances = live(moto)
    assert len(instances) == 2, [i["InstanceId"] for i in instances]
    for instance in instances:
        t = tags(instance)
        assert t["Name"] == f"dask-scaletest-worker-{instance['InstanceId']}"
        assert t[AUTOSCALED_TAG] == "true" and t["dask-ec2-ansible:role"] == "worker" and t[LAUNCH_TAG]
        assert all(t[k] == v for k, v in CLUSTER_TAGS.items())
        assert instance["SubnetId"] == moto["subnets"][0]
    assert list(status["instances"]) == sorted(i["InstanceId"] for i in instances) and status["mode"] == "fixed"


def test_scale_down_retires_then_terminates_only_the_retired_and_keeps_every_result(moto, make_config):
    async def scenario():
        async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
            autoscaler = Autoscaler(make_config(scheduler.address))
            await cluster.scale(3)
            await autoscaler.tick()
            names = sorted(autoscaler.instances)
            # The launched machines' workers join under their instance ids (cloud-init would start them).
            async with Worker(scheduler.address, name=names[0], nthreads=1), \
                    Worker(scheduler.address, name=names[1], nthreads=1):
                async with Client(scheduler.address, asynchronous=True) as client:
                    futures = await client.scatter(list(range(100)))
                    holders = {w for f in futures for w in (await client.who_has([f]))[f.key]}
                    await autoscaler.tick()
                    assert len(autoscaler.workers) == 3 and len(live(moto)) == 2
                    await cluster.scale(1)
                    await autoscaler.tick()
                    results = await client.gather(futures)
                    left = {w.name for w in scheduler.workers.values()}
            return names, holders, results, left

    names, holders, results, left = asyncio.run(scenario())
    assert len(holders) >= 2, "the blocks were spread over more than the fixed worker"
    assert results == list(range(100))
    assert left == {FIXED}
    assert live(moto) == []


def test_an_instance_that_never_joins_is_terminated_after_the_bound(moto, make_config):
    async def scenario():
        async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
            autoscaler = Autoscaler(make_config(scheduler.address, join_timeout=0))
            await cluster.scale(2)
            await autoscaler.tick()
            launched = sorted(autoscaler.instances)
            await asyncio.sleep(1.1)
            await autoscaler.tick()   # the late one goes; a new one is asked for in its place
            return launched, sorted(autoscaler.instances)

    launched, now = asyncio.run(scenario())
    assert len(launched) == 1 and len(now) == 1 and launched != now
    states = {i["InstanceId"]: i["State"]["Name"] for r in moto["ec2"].describe_instances(
        InstanceIds=launched)["Reservations"] for i in r["Instances"]}
    assert states[launched[0]] in ("shutting-down", "terminated")


def test_a_zone_without_capacity_is_skipped_and_a_quota_is_tried_once_per_backoff(moto, make_config, caplog):
    with faults(moto) as proxy:
        proxy.refuse("RunInstances", "InsufficientInstanceCapacity", where={"SubnetId": moto["subnets"][0]})
        asyncio.run(scaled_once(make_config, 2))
        instances = live(moto)
        assert [i["SubnetId"] for i in instances] == [moto["subnets"][1]]
        moto["ec2"].terminate_instances(InstanceIds=[i["InstanceId"] for i in instances])
        proxy.clear()
        proxy.refuse("RunInstances", "VcpuLimitExceeded")

        async def quota():
            async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
                autoscaler = Autoscaler(make_config(scheduler.address))
                await cluster.scale(3)
                for _ in range(5):
                    await autoscaler.tick()
                return autoscaler.last_error

        with caplog.at_level(logging.ERROR, logger="dask_ec2_ansible.autoscaler"):
            error = asyncio.run(quota())
        assert len(proxy.calls("RunInstances", refused=True)) == 1
        assert "VcpuLimitExceeded" in error
        said = [r.message for r in caplog.records if "quota" in r.message]
        assert len(said) == 1 and "scale_maximum" in said[0], said
    assert live(moto) == []


def test_with_aws_spot_a_worker_is_asked_on_spot_then_on_demand_when_refused_and_a_spot_quota_waits_its_backoff(
        moto, make_config, caplog):
    def market(call) -> str:
        return call.params.get("InstanceMarketOptions.MarketType", "on-demand")

    with faults(moto) as proxy:
        spot = asyncio.run(scaled_once(lambda address: make_config(address, spot=True), 2))
        assert [market(c) for c in proxy.calls("RunInstances")] == ["spot"]
        (instance,) = live(moto)
        assert tags(instance)["dask-ec2-ansible:lifecycle"] == "spot"
        assert "dask-ec2-ansible:spot-fallback" not in tags(instance)
        spot.terminate([instance["InstanceId"]], "test")

        # No spot capacity in either zone: on-demand in the first, tagged as a fallback.
        proxy.clear()
        proxy.refuse("RunInstances", "InsufficientInstanceCapacity", where={"InstanceMarketOptions.MarketType": "spot"})
        asyncio.run(scaled_once(lambda address: make_config(address, spot=True), 2))
        tried = [(market(c), c.params["SubnetId"], c.refused) for c in proxy.calls("RunInstances")]
        first, second = moto["subnets"][:2]
        assert tried == [("spot", first, True), ("spot", second, True), ("on-demand", first, False)], tried
        (instance,) = live(moto)
        assert tags(instance)["dask-ec2-ansible:lifecycle"] == "on-demand"
        assert tags(instance)["dask-ec2-ansible:spot-fallback"] == "true"
        moto["ec2"].terminate_instances(InstanceIds=[instance["InstanceId"]])

        # A spot quota: on-demand at once, and the next launches skip spot until the backoff ends.
        proxy.clear()
        proxy.refuse("RunInstances", "MaxSpotInstanceCountExceeded", where={"InstanceMarketOptions.MarketType": "spot"})

        async def quota():
            async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
                autoscaler = Autoscaler(make_config(scheduler.address, spot=True))
                await cluster.scale(3)
                await autoscaler.tick()
                return autoscaler

        with caplog.at_level(logging.WARNING, logger="dask_ec2_ansible.autoscaler"):
            autoscaler = asyncio.run(quota())
        assert [(market(c), c.refused) for c in proxy.calls("RunInstances")] == [
            ("spot", True), ("on-demand", False), ("on-demand", False)]
        assert sorted(tags(i)["dask-ec2-ansible:lifecycle"] for i in live(moto)) == ["on-demand", "on-demand"]
        assert len([r for r in caplog.records if "spot worker on quota" in r.message]) == 1
        assert autoscaler.spot_quota_until > 0


def test_an_autoscaler_killed_in_the_middle_of_a_launch_finds_the_instance_and_launches_no_duplicate(moto, make_config):
    import botocore.exceptions

    with faults(moto) as proxy:
        # EC2 launched it, and the answer never came back (the service was killed, or the connection).
        proxy.reset("RunInstances", nth=1, forward=True)

        async def scenario():
            async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
                config = make_config(scheduler.address)
                await cluster.scale(2)
                with pytest.raises(botocore.exceptions.BotoCoreError):
                    await Autoscaler(config).tick()
                restarted = Autoscaler(config)
                await restarted.tick()
                await restarted.tick()
                return restarted

        restarted = asyncio.run(scenario())
    instances = live(moto)
    assert len(instances) == 1, "no duplicate: the instance launched before the restart was found by its tag"
    assert restarted.state.launches[tags(instances[0])[LAUNCH_TAG]]["instance_id"] == instances[0]["InstanceId"]


def csr_for(tmp_path: Path, name: str) -> str:
    key = tmp_path / f"{name}.key"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    return subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={name}"],
                          capture_output=True, text=True, check=True).stdout


def test_enrollment_signs_once_for_the_launched_instance_from_its_own_address(moto, make_config, issuing, tmp_path):
    autoscaler = asyncio.run(scaled_once(make_config, 3))
    first, second = sorted(autoscaler.instances.values(), key=lambda i: i["InstanceId"])
    user_data = base64.b64decode(moto["ec2"].describe_instance_attribute(
        InstanceId=first["InstanceId"], Attribute="userData")["UserData"]["Value"]).decode()
    token = re.search(r'"token": "([^"]+)"', user_data).group(1)
    other_token = re.search(r'"token": "([^"]+)"', base64.b64decode(moto["ec2"].describe_instance_attribute(
        InstanceId=second["InstanceId"], Attribute="userData")["UserData"]["Value"]).decode()).group(1)
    assert token != other_token and "@ENROLL_TOKEN@" not in user_data
    name, address = first["InstanceId"], first["PrivateIpAddress"]
    csr = csr_for(tmp_path, name)
    refusals = {
        "foreign address": (name, token, csr, second["PrivateIpAddress"]),
        "another instance's token": (name, other_token, csr, address),
        "a name not its own": (name, token, csr_for(tmp_path, second["InstanceId"]), address),
        "not launched by it": ("i-0123456789abcdef0", token, csr, address),
    }
    for what, args in refusals.items():
        with pytest.raises(ValueError):
            autoscaler.enroll(*args)
        assert what
    certificate = autoscaler.enroll(name, token, csr, address)
    (tmp_path / "node.pem").write_text(certificate)
    verified = subprocess.run(["openssl", "verify", "-CAfile", issuing["cert_file"], "-purpose", "sslclient",
                               str(tmp_path / "node.pem")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "RFC2253", "-in",
                              str(tmp_path / "node.pem")], capture_output=True, text=True, check=True).stdout
    assert subject.strip() == f"subject=CN={name}"
    with pytest.raises(ValueError, match="replayed"):
        autoscaler.enroll(name, token, csr, address)
    # Only digests of the tokens are kept on the machine.
    state = json.loads((Path(autoscaler.config["state_dir"]) / "state.json").read_text())
    assert token not in json.dumps(state) and other_token not in json.dumps(state)


def test_adaptive_grows_for_a_queued_graph_and_shrinks_back_after_the_wait_count(moto, make_config):
    """cluster.adapt(): the target is the scheduler's adaptive_target (Dask's policy), within the limits; a
    worker is retired only after wait_count decisions in a row say so; never more than the maximum launched."""
    import time

    async def scenario():
        async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
            autoscaler = Autoscaler(make_config(scheduler.address))
            request = cluster.adapt(minimum=0, maximum=10, target_duration="1s", wait_count=2)
            async with Client(scheduler.address, asynchronous=True) as client:
                futures = client.map(time.sleep, [0.2] * 200, pure=False)
                await asyncio.sleep(1)
                await autoscaler.tick()
                grown, most = sorted(autoscaler.instances), len(live(moto))
                extra = [Worker(scheduler.address, name=name, nthreads=1) for name in grown]
                for worker in extra:
                    await worker
                await client.gather(futures)
                sizes = []
                for _ in range(6):
                    await autoscaler.tick()
                    most = max(most, len(live(moto)))
                    sizes.append(len(autoscaler.instances))
                for worker in extra:
                    await worker.close()
            return request, grown, most, sizes

    with pytest.warns(ScalingWarning):   # minimum 0 and maximum 10 are clamped to the limits 1 and 3
        request, grown, most, sizes = asyncio.run(scenario())
    assert (request.minimum, request.maximum) == (1, 3)
    assert len(grown) == 2 and most == 2, "grew to the maximum, never beyond it"
    assert sizes[0] == 2, "the first decision to shrink waits (wait_count 2)"
    assert sizes[-1] == 0 and live(moto) == []


def test_the_settings_start_it_adaptive_a_notebooks_request_holds_over_a_restart_and_changed_settings_win(
        moto, make_config):
    """adaptive=true (site.yml): it starts adaptive within [scale_minimum, scale_maximum]; cluster.scale(n) then
    holds over a restart of the service; site.yml changing the settings applies them again; cluster.adapt() with
    no minimum takes scale_minimum from the autoscaler (a kernel is not told it)."""
    async def scenario():
        async with scheduler_with_one_fixed_worker() as (scheduler, _, cluster):
            adaptive = make_config(scheduler.address, initial={"mode": "adaptive", "minimum": 2, "maximum": 3},
                                   minimum=2)
            first = Autoscaler(adaptive)
            await first.read_request()
            seen = {"settings": (first.mode, first.minimum, first.maximum)}
            await cluster.scale(3)
            restarted = Autoscaler(adaptive)
            await restarted.read_request()
            seen["restart"] = (restarted.mode, restarted.requested_n)
            changed = Autoscaler(make_config(scheduler.address, initial={"mode": "fixed", "n": 1}, minimum=2))
            await changed.tick()
            seen["changed"] = (changed.mode, changed.requested_n)
            await cluster._read_scheduler()
            request = cluster.adapt(maximum=3)
            await asyncio.sleep(0.1)
            seen["adapt"] = (request.minimum, await cluster.scheduler_comm.get_metadata(
                keys=["dask-ec2-ansible", "request"]))
            return seen

    seen = asyncio.run(scenario())
    assert seen["settings"] == ("adaptive", 2, 3)
    assert seen["restart"] == ("fixed", 3), "a restart keeps what the notebook asked"
    assert seen["changed"] == ("fixed", 1), "changed settings win over the notebook's request"
    assert seen["adapt"] == (2, {"mode": "adaptive", "minimum": 2, "maximum": 3})


def test_a_booting_worker_tries_its_enrollment_again_while_the_autoscaler_does_not_answer_but_not_a_refusal(
        monkeypatch):
    """The autoscaler restarting (or not listening yet) when a worker boots must not leave the worker out until
    the join bound terminates it; a refusal (403) is final."""
    import io
    import ssl
    import urllib.error

    from dask_ec2_ansible import boot

    answers = [ConnectionRefusedError("refused"), urllib.error.URLError("restarting"),
               urllib.error.HTTPError("u", 503, "busy", {}, None), io.BytesIO(b'{"certificate": "PEM"}')]
    slept = []

    def urlopen(request, timeout, context):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return contextlib.nullcontext(answer)

    monkeypatch.setattr(boot.urllib.request, "urlopen", urlopen)
    context = ssl.create_default_context()
    assert boot.enroll("https://10.0.0.1:8795/enroll", {"instance_id": "i-1"}, context, sleep=slept.append) == "PEM"
    assert slept == [1.0, 2.0, 4.0]
    answers[:] = [urllib.error.HTTPError("u", 403, "refused", {}, None), io.BytesIO(b'{"certificate": "PEM"}')]
    with pytest.raises(urllib.error.HTTPError):
        boot.enroll("https://10.0.0.1:8795/enroll", {"instance_id": "i-1"}, context, sleep=slept.append)
    answers[:] = [ConnectionRefusedError("refused")] * 10
    with pytest.raises(RuntimeError, match="did not answer within 0 s"):
        boot.enroll("https://10.0.0.1:8795/enroll", {"instance_id": "i-1"}, context, patience=0, sleep=slept.append)
