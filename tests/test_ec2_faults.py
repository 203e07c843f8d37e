"""When EC2 says no: the aws provider against moto_server behind a fault-injecting proxy.

moto grants every request; tests/ec2_faults.py answers chosen requests as EC2
does when it refuses (InsufficientInstanceCapacity as an HTTP 500,
RequestLimitExceeded 503, VcpuLimitExceeded 400, a connection reset) and
records every request, so a test can assert what was asked (spot market
options) and how often EC2 was asked before the playbooks found a way. Every
playbook test ends by asserting EC2's final state and that teardown leaves
nothing. Counts of requests are asserted, not wall time.
"""

from __future__ import annotations

import json

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import HTTPClientError

from conftest import ROOT, run_playbook
from ec2_faults import EC2FaultProxy
from test_aws import BASE_ARGS, REGION, aws_env, instances, leftovers, moto_server, nothing_left, tags

LIFECYCLE = "dask-ec2-ansible:lifecycle"


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto-faults")) as endpoint:
        yield endpoint


@pytest.fixture
def proxy(moto):
    with EC2FaultProxy(moto) as front:
        yield front


def client(endpoint, attempts=1):
    return boto3.client("ec2", region_name=REGION, endpoint_url=endpoint, aws_access_key_id="testing",
                        aws_secret_access_key="testing",
                        config=Config(retries={"mode": "standard", "total_max_attempts": attempts}))


def default_subnets(endpoint):
    subnets = client(endpoint).describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    return sorted(subnets, key=lambda s: s["AvailabilityZone"])


def refused_code(call):
    with pytest.raises(ClientError) as error:
        call()
    return error.value.response["ResponseMetadata"]["HTTPStatusCode"], error.value.response["Error"]["Code"]


def run_args(image="ami-0" + "0" * 15 + "1"):
    return {"ImageId": image, "MinCount": 1, "MaxCount": 1, "InstanceType": "t3.nano"}


# ---- the proxy itself ---------------------------------------------------------

def test_proxy_forwards_and_records_every_request(proxy):
    ec2 = client(proxy.url)
    assert ec2.describe_regions()["Regions"]
    ec2.describe_instances(Filters=[{"Name": "tag:Name", "Values": ["x"]}])
    assert [c.action for c in proxy.calls()] == ["DescribeRegions", "DescribeInstances"]
    described = proxy.calls("DescribeInstances")[0]
    assert described.params["Filter.1.Name"] == "tag:Name" and described.params["Filter.1.Value.1"] == "x"
    assert described.status == 200 and not described.refused


def test_proxy_refuses_by_action_and_parameters_as_ec2_does(proxy):
    subnet = default_subnets(proxy.url)[0]["SubnetId"]
    proxy.refuse("RunInstances", "InsufficientInstanceCapacity", where={"InstanceType": "t3.nano", "SubnetId": subnet})
    proxy.refuse("RunInstances", "InsufficientInstanceCapacity", where={"InstanceMarketOptions.MarketType": "spot"})
    ec2 = client(proxy.url)
    assert refused_code(lambda: ec2.run_instances(**run_args(), SubnetId=subnet)) == (500, "InsufficientInstanceCapacity")
    assert refused_code(lambda: ec2.run_instances(**run_args(), InstanceMarketOptions={"MarketType": "spot"})) == \
        (500, "InsufficientInstanceCapacity")
    granted = ec2.run_instances(**dict(run_args(), InstanceType="t3.micro"), SubnetId=subnet)["Instances"][0]
    assert [(c.params["InstanceType"], c.code) for c in proxy.calls("RunInstances")] == [
        ("t3.nano", "InsufficientInstanceCapacity"), ("t3.nano", "InsufficientInstanceCapacity"), ("t3.micro", None)]
    ec2.terminate_instances(InstanceIds=[granted["InstanceId"]])


def test_proxy_refuses_the_first_n_calls_then_lets_them_through(proxy):
    proxy.refuse("DescribeRegions", "RequestLimitExceeded", first=2)
    ec2 = client(proxy.url)
    assert refused_code(ec2.describe_regions) == (503, "RequestLimitExceeded")
    assert refused_code(ec2.describe_regions) == (503, "RequestLimitExceeded")
    assert ec2.describe_regions()["Regions"]
    # botocore's standard retries ride over it, as the playbooks' clients must.
    proxy.refuse("DescribeRegions", "RequestLimitExceeded", first=2)
    assert client(proxy.url, attempts=4).describe_regions()["Regions"]
    assert len(proxy.calls("DescribeRegions", code="RequestLimitExceeded")) == 4


def test_proxy_resets_the_nth_call_with_or_without_carrying_it_out(proxy):
    proxy.reset("RunInstances", nth=1, forward=False)
    proxy.reset("RunInstances", nth=2, forward=True)
    ec2 = client(proxy.url)
    marker = {"ResourceType": "instance", "Tags": [{"Key": "probe", "Value": "reset"}]}
    for _ in range(2):
        with pytest.raises((BotoConnectionError, HTTPClientError)):
            ec2.run_instances(**run_args(), TagSpecifications=[marker])
    made = [i for r in ec2.describe_instances(Filters=[{"Name": "tag:probe", "Values": ["reset"]}])["Reservations"]
            for i in r["Instances"]]
    assert len(made) == 1, "only the forwarded call reached moto"
    assert [c.code for c in proxy.calls("RunInstances")] == ["reset", "reset"]
    ec2.terminate_instances(InstanceIds=[made[0]["InstanceId"]])


def test_a_rule_fails_a_test(proxy):
    """The base of the other tests: an injected refusal must reach the caller, not vanish."""
    proxy.refuse("DescribeVpcs", "VcpuLimitExceeded")
    with pytest.raises(ClientError, match="VcpuLimitExceeded"):
        client(proxy.url, attempts=3).describe_vpcs()
    assert len(proxy.calls("DescribeVpcs")) == 1, "a 400 is not retried"


# ---- the playbooks ------------------------------------------------------------

def provision(proxy, cluster, *args, check=True):
    return run_playbook("playbooks/provision.yml", *BASE_ARGS, "-e", f"cluster_name={cluster}", *args,
                        env=aws_env(proxy.url), name=f"faults-{cluster}-provision", check=check)


def teardown_leaves_nothing(proxy, cluster):
    env = aws_env(proxy.url)
    proxy.clear()
    # save_work=false: behind the proxy no machine answers, and the save would try SSH to moto's invented
    # public addresses (tests/test_faults.py proves the path of machines that do not answer).
    run_playbook("teardown.yml", "-e", "provider=aws", "-e", f"cluster_name={cluster}", "-e", "save_work=false",
                 env=env, name=f"faults-{cluster}-teardown")
    assert leftovers(env, cluster) == nothing_left(env, cluster)
    assert not (ROOT / ".clusters" / cluster).exists()


def status(proxy):
    return run_playbook("playbooks/status.yml", "-e", f"regions={REGION}", env=aws_env(proxy.url), name="faults-status")


def launches(proxy, name):
    """The RunInstances requests for the machine `name` (its Name tag is in the request)."""
    return [c for c in proxy.calls("RunInstances") if name in c.params.values()]


def by_name(proxy, cluster):
    return {n: (i["InstanceType"], tags(i).get(LIFECYCLE)) for n, i in instances(aws_env(proxy.url), cluster).items()}


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_spot_workers_ask_for_spot_and_throttling_is_retried(proxy):
    cluster = "fspot"
    proxy.refuse("RunInstances", "RequestLimitExceeded", first=2)
    proxy.refuse("DescribeInstances", "RequestLimitExceeded", first=3)
    provision(proxy, cluster, "-e", "worker_count=1", "-e", "aws_spot=true")
    worker = launches(proxy, f"dask-{cluster}-worker-1")[-1]
    assert worker.params["InstanceMarketOptions.MarketType"] == "spot"
    assert worker.params["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    scheduler = launches(proxy, f"dask-{cluster}-scheduler")[-1]
    assert "InstanceMarketOptions.MarketType" not in scheduler.params, "the scheduler is never spot"
    assert len(proxy.calls("RunInstances", code="RequestLimitExceeded")) == 2
    assert len(proxy.calls("RunInstances", refused=False)) == 2, "throttled requests retried, nothing launched twice"
    assert by_name(proxy, cluster) == {f"dask-{cluster}-scheduler": ("t3.large", "on-demand"),
                                       f"dask-{cluster}-worker-1": ("m6i.large", "spot")}
    proxy.clear()
    # make status, throttled more than botocore's legacy default (5 attempts) would survive.
    proxy.refuse("DescribeInstances", "RequestLimitExceeded", first=5)
    shown = status(proxy).output
    assert len(proxy.calls("DescribeInstances", code="RequestLimitExceeded")) == 5
    assert "(1 spot)" in shown, shown[-3000:]
    teardown_leaves_nothing(proxy, cluster)


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_spot_refused_falls_back_to_on_demand_at_once(proxy):
    cluster = "ffallback"
    zones = len(default_subnets(proxy.url))
    proxy.refuse("RunInstances", "InsufficientInstanceCapacity", where={"InstanceMarketOptions.MarketType": "spot"})
    run = provision(proxy, cluster, "-e", "worker_count=2", "-e", "aws_spot=true")
    spot_refused = proxy.calls("RunInstances", code="InsufficientInstanceCapacity")
    # Spot tried once per zone for the first worker; the second goes on demand straight away.
    assert len(spot_refused) == zones, [(c.params["SubnetId"], c.params["InstanceType"]) for c in spot_refused]
    assert {c.params["SubnetId"] for c in spot_refused} == {s["SubnetId"] for s in default_subnets(proxy.url)}
    assert len(proxy.calls("RunInstances", refused=False)) == 3
    assert by_name(proxy, cluster) == {f"dask-{cluster}-scheduler": ("t3.large", "on-demand"),
                                       f"dask-{cluster}-worker-1": ("m6i.large", "on-demand"),
                                       f"dask-{cluster}-worker-2": ("m6i.large", "on-demand")}
    assert f"On demand, not spot: dask-{cluster}-worker-1, dask-{cluster}-worker-2" in run.output, run.output[-4000:]
    proxy.clear()
    shown = status(proxy).output
    assert f"on demand, spot refused: dask-{cluster}-worker-1, dask-{cluster}-worker-2" in shown, shown[-3000:]
    teardown_leaves_nothing(proxy, cluster)


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
@pytest.mark.parametrize("given", [False, True], ids=["default-subnets", "vpc_subnet_ids"])
def test_capacity_refused_in_one_zone_is_found_in_the_next(proxy, given):
    cluster = "fzone"
    subnets = default_subnets(proxy.url)
    # The user's order (last zone first) is the order tried; else zone order.
    first, second = (subnets[-1], subnets[-2]) if given else (subnets[0], subnets[1])
    args = ["-e", json.dumps({"vpc_subnet_ids": [first["SubnetId"], second["SubnetId"]]})] if given else []
    proxy.refuse("RunInstances", "InsufficientInstanceCapacity",
                 where={"InstanceType": "m6i.large", "SubnetId": first["SubnetId"]})
    run = provision(proxy, cluster, "-e", "worker_count=1", *args)
    assert len(proxy.calls("RunInstances", refused=True)) == 1
    live = instances(aws_env(proxy.url), cluster)
    assert live[f"dask-{cluster}-scheduler"]["SubnetId"] == first["SubnetId"]
    assert live[f"dask-{cluster}-worker-1"]["SubnetId"] == second["SubnetId"]
    assert by_name(proxy, cluster) == {f"dask-{cluster}-scheduler": ("t3.large", "on-demand"),
                                       f"dask-{cluster}-worker-1": ("m6i.large", "on-demand")}
    assert "traffic between availability zones is billed" in run.output
    teardown_leaves_nothing(proxy, cluster)


@pytest.mark.parametrize(("code", "refusals", "words"), [
    ("VcpuLimitExceeded", 1, ["quota", "VcpuLimitExceeded", "Service Quotas", "worker_count", "L-1216C47A"]),
    ("InsufficientInstanceCapacity", None, ["no capacity for m6i.large", "another instance type", "vpc_subnet_ids"]),
], ids=["quota", "no-capacity-anywhere"])
@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_a_limit_that_cannot_be_worked_around_stops_with_what_to_do_and_leaves_nothing(proxy, code, refusals, words):
    cluster = "flimit"
    proxy.refuse("RunInstances", code, where={"InstanceType": "m6i.large"})
    run = provision(proxy, cluster, "-e", "worker_count=2", check=False)
    assert run.returncode != 0
    for word in words:
        assert word in run.output, (word, run.output[-4000:])
    assert "Terminated the 1 instance(s) this run had launched" in run.output
    refused = proxy.calls("RunInstances", refused=True)
    assert len(refused) == (refusals or len(default_subnets(proxy.url))), "one request per zone at most, no retries"
    env = aws_env(proxy.url)
    assert instances(env, cluster) == {}, "nothing launched by the failed run is left running"
    assert set(instances(env, cluster, states=("terminated", "shutting-down"))) == {f"dask-{cluster}-scheduler"}
    teardown_leaves_nothing(proxy, cluster)


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_a_half_made_cluster_is_kept_when_asked_and_completed_by_the_next_run(proxy):
    cluster = "fhalf"
    proxy.refuse("RunInstances", "InsufficientInstanceCapacity",
                 where=lambda params: f"dask-{cluster}-worker-2" in params.values())
    run = provision(proxy, cluster, "-e", "worker_count=2", "-e", "keep_on_launch_failure=true", check=False)
    assert run.returncode != 0 and "Kept the 2 instance(s)" in run.output, run.output[-3000:]
    before = instances(aws_env(proxy.url), cluster)
    assert sorted(before) == [f"dask-{cluster}-scheduler", f"dask-{cluster}-worker-1"]
    proxy.clear()
    provision(proxy, cluster, "-e", "worker_count=2", "-e", '{"cluster_tags": {"project": "ci", "team": "faults"}}')
    after = instances(aws_env(proxy.url), cluster)
    assert {n: tags(i).get("team") for n, i in after.items()} == dict.fromkeys(after, "faults"), \
        "the machines that were there got the new tag too"
    assert sorted(after) == [f"dask-{cluster}-scheduler", f"dask-{cluster}-worker-1", f"dask-{cluster}-worker-2"]
    assert all(after[n]["InstanceId"] == before[n]["InstanceId"] for n in before)
    assert [c.code for c in proxy.calls("RunInstances")] == [None], "only the missing worker is launched"
    assert launches(proxy, f"dask-{cluster}-worker-2"), "and it is worker-2"
    teardown_leaves_nothing(proxy, cluster)


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_a_launch_whose_answer_is_lost_converges_without_duplicates(proxy):
    cluster = "freset"
    # The 2nd RunInstances (worker-1) reaches EC2, but the connection is reset before the answer.
    proxy.reset("RunInstances", nth=2, forward=True)
    provision(proxy, cluster, "-e", "worker_count=2")
    assert [c.code for c in proxy.calls("RunInstances")] == [None, "reset", None]
    env = aws_env(proxy.url)
    first = instances(env, cluster)
    assert sorted(first) == [f"dask-{cluster}-scheduler", f"dask-{cluster}-worker-1", f"dask-{cluster}-worker-2"]
    proxy.clear()
    again = provision(proxy, cluster, "-e", "worker_count=2")
    assert proxy.calls("RunInstances") == [], "the next run launches nothing"
    assert again.changed == 0, again.changed_tasks()
    assert {n: i["InstanceId"] for n, i in instances(env, cluster).items()} == \
        {n: i["InstanceId"] for n, i in first.items()}
    teardown_leaves_nothing(proxy, cluster)

