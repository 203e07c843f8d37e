"""Cost guardrails and account hygiene on the aws provider, against moto_server.

One moto_server for the module; two users (IAM users, so that STS tells them
apart) with clusters in two regions (eu-west-1, us-east-1), and resources
left behind by hand: what status.yml reports, what the cost estimate and
max_hourly_cost do before a launch, required_tags, and what
`teardown.yml -e cluster_name=all_mine` removes (only the caller's).

What moto cannot show: moto does not implement the AWS Price List API
(`pricing`, it answers 500), so every estimate here comes from the shipped
price table (roles/provider_aws/files/ec2_prices.yml) and the tests assert
that the output says so; the API path is not exercised by any test.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import yaml

from conftest import ARTIFACTS, ROOT, VENV_BIN, PlaybookRun
from test_aws import BASE_ARGS, CLUSTER_TAG, aws_env, moto_server, nothing_left, tags

boto3 = pytest.importorskip("boto3")

EU, US = "eu-west-1", "us-east-1"
OWNER_TAG = "dask-ec2-ansible:owner"
OURS = {"dask-ec2-ansible:created-by": "dask-ec2-ansible"}
PRICES = yaml.safe_load((ROOT / "roles" / "provider_aws" / "files" / "ec2_prices.yml").read_text())
TWO_REGIONS = f"regions={EU},{US}"


def run(playbook: str, *extra: str, env: dict, name: str, check: bool = True, timeout: int = 900) -> PlaybookRun:
    """ansible-playbook as a user would run it from a script: no terminal on stdin."""
    args = [str(VENV_BIN / "ansible-playbook"), playbook, *extra]
    env = dict(env, ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1", PY_COLORS="0")
    proc = subprocess.run(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.log").write_text(proc.stdout + proc.stderr)
    result = PlaybookRun(args, proc.returncode, proc.stdout + proc.stderr)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args[1:])} failed (rc={proc.returncode}):\n{result.output[-6000:]}")
    return result


def in_region(env: dict, region: str) -> dict:
    return dict(env, AWS_REGION=region, AWS_DEFAULT_REGION=region)


def client(env: dict, service: str = "ec2"):
    return boto3.client(service, region_name=env["AWS_REGION"], endpoint_url=env["AWS_ENDPOINT_URL"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def instances(env: dict, cluster: str) -> dict:
    """{Name: instance} of the cluster's live instances in env's region (test_aws's helpers ask eu-west-1 only)."""
    pages = client(env).get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    return {tags(i)["Name"]: i for page in pages for r in page["Reservations"] for i in r["Instances"]}


def leftovers(env: dict, cluster: str) -> dict:
    """As test_aws.leftovers, in env's region."""
    ec2c, by_tag = client(env), [{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
    return {
        "instances": sorted(instances(env, cluster)),
        "security_groups": [g["GroupName"] for g in ec2c.describe_security_groups(Filters=by_tag)["SecurityGroups"]],
        "key_pairs": [k["KeyName"] for k in ec2c.describe_key_pairs()["KeyPairs"] if k["KeyName"] == f"dask-{cluster}"],
        "tagged_key_pairs": [k["KeyName"] for k in ec2c.describe_key_pairs(Filters=by_tag)["KeyPairs"]],
        "launch_templates": [t["LaunchTemplateName"] for t in ec2c.describe_launch_templates()["LaunchTemplates"]
                             if t["LaunchTemplateName"].startswith(f"dask-{cluster}-")],
    }


def provision_args(cluster: str, *extra: str) -> list[str]:
    return ["playbooks/provision.yml", *BASE_ARGS, "-e", f"cluster_name={cluster}", *extra]


def leave_behind(env: dict, cluster: str, owner: str, group: bool = True) -> dict:
    """A security group and an unattached volume of a cluster that is gone, as a failed run or a hand leaves them."""
    ec2c = client(env)
    spec = [{"Key": CLUSTER_TAG, "Value": cluster}, {"Key": OWNER_TAG, "Value": owner},
            *({"Key": k, "Value": v} for k, v in OURS.items())]
    # From a snapshot: moto leaves SnapshotId out of a volume made empty (EC2 says ""), and
    # amazon.aws.ec2_vol_info 10.1.2 then fails on the missing key.
    zone = f"{env['AWS_REGION']}a"
    seed = ec2c.create_volume(AvailabilityZone=zone, Size=1)["VolumeId"]
    snapshot = ec2c.create_snapshot(VolumeId=seed)["SnapshotId"]
    ec2c.delete_volume(VolumeId=seed)
    made = {"volume": ec2c.create_volume(AvailabilityZone=zone, Size=10, VolumeType="gp3", SnapshotId=snapshot,
                                         TagSpecifications=[{"ResourceType": "volume", "Tags": spec}])["VolumeId"]}
    if group:
        made["security group"] = ec2c.create_security_group(
            GroupName=f"dask-{cluster}", Description="left behind",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": spec}])["GroupId"]
    return made


def tagged_volumes(env: dict, cluster: str) -> list[str]:
    return [v["VolumeId"] for v in client(env).describe_volumes(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}])["Volumes"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Alice: hyga (eu-west-1), hygb (us-east-1), leftovers of hygold (eu-west-1).
    Bob: hygc (eu-west-1), a leftover volume of hygbob (us-east-1)."""
    with moto_server(tmp_path_factory.mktemp("moto-hygiene")) as endpoint:
        root = client(aws_env(endpoint), "iam")
        users = {}
        for user in ("alice", "bob"):
            arn = root.create_user(UserName=user)["User"]["Arn"]
            key = root.create_access_key(UserName=user)["AccessKey"]
            users[user] = {"arn": arn, "env": aws_env(endpoint, key["AccessKeyId"], key["SecretAccessKey"])}
        alice, bob = users["alice"]["env"], users["bob"]["env"]
        assert client(alice, "sts").get_caller_identity()["Arn"] == users["alice"]["arn"] != users["bob"]["arn"]

        # The three launches at once (different clusters; this keeps the module at a few minutes).
        launches = {
            "hyga": (alice, provision_args("hyga", "-e", "worker_count=1", "-e", '{"required_tags": ["project"]}',
                                           "-e", "max_hourly_cost=1")),
            "hygb": (in_region(alice, US), provision_args("hygb", "-e", "worker_count=2")),
            "hygc": (bob, provision_args("hygc", "-e", "worker_count=1")),
        }
        started = time.monotonic()
        procs = {name: subprocess.Popen([str(VENV_BIN / "ansible-playbook"), *args], cwd=ROOT,
                                        env=dict(env, ANSIBLE_NOCOLOR="1"), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for name, (env, args) in launches.items()}
        outputs = {name: proc.communicate(timeout=900)[0] for name, proc in procs.items()}
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name, output in outputs.items():
            (ARTIFACTS / f"hygiene-provision-{name}.log").write_text(output)
            assert procs[name].returncode == 0, output[-4000:]
        (ARTIFACTS / "hygiene-times.txt").write_text(f"three provisions in parallel: {time.monotonic() - started:.0f} s\n")

        left = {"hygold": leave_behind(alice, "hygold", users["alice"]["arn"]),
                "hygbob": leave_behind(in_region(bob, US), "hygbob", users["bob"]["arn"], group=False)}
        yield {"users": users, "alice": alice, "bob": bob, "outputs": outputs, "left": left}


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_every_resource_carries_its_owner(world):
    for cluster, env, user in (("hyga", world["alice"], "alice"), ("hygb", in_region(world["alice"], US), "alice"),
                               ("hygc", world["bob"], "bob")):
        arn, ec2c = world["users"][user]["arn"], client(env)
        found = instances(env, cluster)
        assert len(found) >= 2, cluster
        resources = [*found.values(),
                     *ec2c.describe_security_groups(GroupNames=[f"dask-{cluster}"])["SecurityGroups"],
                     *ec2c.describe_key_pairs(KeyNames=[f"dask-{cluster}"])["KeyPairs"],
                     *ec2c.describe_volumes(Filters=[{"Name": "attachment.instance-id",
                                                      "Values": [i["InstanceId"] for i in found.values()]}])["Volumes"]]
        assert len(resources) == 2 * len(found) + 2
        assert {tags(r).get(OWNER_TAG) for r in resources} == {arn}, cluster


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_cost_is_shown_before_the_launch_from_the_dated_price_table(world):
    out = world["outputs"]["hyga"]
    table = PRICES["instances"][EU]
    expected = table["t3.large"] + table["m6i.large"] + 2 * 30 * PRICES["gp3_gib_month"][EU] / 730
    assert f"Cluster hyga in {EU}: about ${expected:.4f} per hour" in out, out[-5000:]
    assert f"1 x t3.large (scheduler) in {EU}: 1 x ${table['t3.large']:.4f}/h + 1 x 30 GiB gp3" in out
    # The source and its date, and why the API was not used (moto has no Price List API).
    assert f"Prices: price table of {PRICES['as_of']}" in out
    assert "the AWS Price List API was not used: ClientError" in out
    assert "Cap: max_hourly_cost $1.0000" in out
    assert out.index("Show what the cluster costs per hour") < out.index("Import the cluster's SSH key") \
        < out.index("Launch the machines that are missing")
    assert "Cap: none (max_hourly_cost 0)" in world["outputs"]["hygb"]


_EU = PRICES["instances"][EU]
DEFAULT_EU_HOURLY = _EU["t3.large"] + 2 * _EU["m6i.large"] + 3 * 30 * PRICES["gp3_gib_month"][EU] / 730  # 2 workers

REFUSALS = [
    pytest.param(["-e", "max_hourly_cost=0.15"], "hygcap",
                 [f"would cost about ${DEFAULT_EU_HOURLY:.4f} per hour, more than max_hourly_cost ($0.1500). Nothing was created."],
                 id="cost-cap-exceeded"),
    pytest.param(["-e", "max_hourly_cost=0.1", "-e", "aws_spot=true"], "hygspot",
                 ["more than max_hourly_cost", "the on-demand price shown is the most they can cost"],
                 id="cost-cap-exceeded-spot"),
    pytest.param(["-e", "max_hourly_cost=50", "-e", "worker_instance_type=m6i.24xlarge"], "hygunk",
                 ["no price for m6i.24xlarge in eu-west-1", "so the cap cannot be checked"], id="unknown-price-with-cap"),
    pytest.param(["-e", json.dumps({"required_tags": ["Owner", "project", "Email"],
                                    "cluster_tags": {"project": "ci", "Email": ""}})], "hygtag",
                 ["required_tags asks for tag(s) that cluster_tags lacks or leaves empty: Owner, Email"],
                 id="missing-required-tags"),
]


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
@pytest.mark.parametrize(("args", "cluster", "messages"), REFUSALS)
def test_site_yml_stops_in_preflight_before_anything_exists(world, args, cluster, messages):
    env = world["alice"]
    result = run("site.yml", *BASE_ARGS, "-e", f"cluster_name={cluster}", *args, env=env,
                 name=f"hygiene-refused-{cluster}", check=False)
    assert result.returncode != 0
    for message in messages:
        assert message in result.output, result.output[-4000:]
    assert "PLAY [Provision the cluster's machines]" not in result.output
    assert leftovers(env, cluster) == nothing_left(env, cluster)
    assert tagged_volumes(env, cluster) == []
    assert not (ROOT / ".clusters" / cluster).exists()


def status(env, *extra, name):
    started = time.monotonic()
    result = run("playbooks/status.yml", *extra, env=env, name=name)
    seconds = time.monotonic() - started
    with (ARTIFACTS / "hygiene-times.txt").open("a") as times:
        times.write(f"{name}: {seconds:.1f} s\n")
    return result, json.loads((ROOT / ".clusters" / "status.json").read_text()), seconds


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_make_status_lists_clusters_in_two_regions_and_what_is_left_behind(world):
    alice, users = world["alice"], world["users"]
    # Bob's hygc as idle_shutdown leaves a cluster: stopped, its volumes kept.
    hygc = [i["InstanceId"] for r in client(world["bob"]).describe_instances(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": ["hygc"]}])["Reservations"] for i in r["Instances"]]
    client(world["bob"]).stop_instances(InstanceIds=hygc)
    started = time.monotonic()
    proc = subprocess.run(["make", "--no-print-directory", "status", f"REGIONS={EU},{US}"], cwd=ROOT,
                          env=dict(alice, ANSIBLE_NOCOLOR="1"), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=900)
    with (ARTIFACTS / "hygiene-times.txt").open("a") as times:
        times.write(f"make status REGIONS={EU},{US}: {time.monotonic() - started:.1f} s\n")
    (ARTIFACTS / "hygiene-make-status.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "-e regions=eu-west-1,us-east-1" in proc.stdout
    assert "Looked in 2 region(s): eu-west-1, us-east-1." in proc.stdout
    for header in ("CLUSTER", "REGION", "MACHINES", "AGE", "OWNER", "TAGS", "USD/HOUR", "USD SO FAR", "LEFTOVER"):
        assert header in proc.stdout
    report = json.loads((ROOT / ".clusters" / "status.json").read_text())
    assert report["owner"] == users["alice"]["arn"] and report["regions"] == [EU, US]
    clusters = {(c["name"], c["region"]): c for c in report["clusters"]}
    assert set(clusters) == {("hyga", EU), ("hygb", US), ("hygc", EU)}
    assert clusters[("hygb", US)]["machines"] == {"scheduler": {"t3.large": 1}, "worker": {"m6i.large": 2}}
    assert clusters[("hyga", EU)]["instances"] == {"scheduler": 1, "worker": 1}
    assert clusters[("hyga", EU)]["owners"] == [users["alice"]["arn"]] and clusters[("hyga", EU)]["mine"]
    assert clusters[("hygc", EU)]["owners"] == [users["bob"]["arn"]] and not clusters[("hygc", EU)]["mine"]
    assert clusters[("hyga", EU)]["tags"] == {"project": "ci"}
    stopped_monthly = 2 * 30 * PRICES["gp3_gib_month"][EU]
    assert clusters[("hygc", EU)]["stopped"] and not clusters[("hyga", EU)]["stopped"]
    assert clusters[("hygc", EU)]["monthly_storage_usd"] == pytest.approx(stopped_monthly, abs=0.01)
    assert (f"Stopped: hygc ({EU}) keeps 60 GiB of disk with its notebooks, about ${stopped_monthly:.2f} per month"
            in proc.stdout)
    us = PRICES["instances"][US]
    assert clusters[("hygb", US)]["hourly_usd"] == pytest.approx(
        us["t3.large"] + 2 * us["m6i.large"] + 3 * 30 * PRICES["gp3_gib_month"][US] / 730, abs=1e-4)
    for cluster in clusters.values():
        # (rounded to hundredths of an hour: a cluster launched seconds ago is 0.0)
        assert 0 <= cluster["age_hours"] < 1 and cluster["cost_so_far_usd"] is not None
        assert cluster["price_sources"] == [f"price table of {PRICES['as_of']} ({PRICES['source']})"]
    left = {(item["kind"], item["id"]): item for item in report["leftovers"]}
    hygold, hygbob = world["left"]["hygold"], world["left"]["hygbob"]
    assert set(left) == {("volume", hygold["volume"]), ("security group", hygold["security group"]),
                         ("volume", hygbob["volume"])}
    assert left[("volume", hygold["volume"])]["monthly_usd"] == pytest.approx(10 * PRICES["gp3_gib_month"][EU])
    assert left[("volume", hygold["volume"])]["mine"] and not left[("volume", hygbob["volume"])]["mine"]
    assert {(m["name"], m["region"]) for m in report["mine"]} == {("hyga", EU), ("hygb", US), ("hygold", EU)}
    assert report["errors"] == {}


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_status_looks_in_every_enabled_region_without_provider_or_regions(world):
    result, report, seconds = status(world["bob"], name="hygiene-status-all-regions")
    enabled = sorted(r["RegionName"] for r in client(world["bob"]).describe_regions()["Regions"]
                     if not r["RegionName"].startswith(("us-gov-", "cn-")))
    assert report["regions"] == enabled and len(enabled) > 20
    assert f"Looked in {len(enabled)} region(s)" in result.output
    assert {(c["name"], c["region"]) for c in report["clusters"]} == {("hyga", EU), ("hygb", US), ("hygc", EU)}
    assert {(m["name"], m["region"]) for m in report["mine"]} == {("hygc", EU), ("hygbob", US)}
    assert seconds < 300


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_teardown_all_mine_refuses_without_a_terminal_or_confirm(world):
    alice = world["alice"]
    before = {c: sorted(instances(in_region(alice, r), c)) for c, r in (("hyga", EU), ("hygb", US), ("hygc", EU))}
    result = run("teardown.yml", "-e", "cluster_name=all_mine", "-e", TWO_REGIONS, env=alice,
                 name="hygiene-all-mine-refused", check=False, timeout=600)
    assert result.returncode != 0
    assert 'Nothing was removed: the answer was not "yes" (no terminal to ask on).' in result.output
    assert "-e confirm=yes" in result.output
    listing = result.output[result.output.index("List what will be removed]"):]
    assert all(f"{r} | {c} |" in listing for c, r in (("hyga", EU), ("hygb", US), ("hygold", EU)))
    assert "hygc" not in listing
    assert {c: sorted(instances(in_region(alice, r), c)) for c, r in (("hyga", EU), ("hygb", US), ("hygc", EU))} == before
    assert tagged_volumes(alice, "hygold") == [world["left"]["hygold"]["volume"]]


@pytest.mark.slow  # make test-slow: make test must stay within CI's time
def test_teardown_all_mine_removes_every_cluster_of_mine_and_nothing_else(world):
    alice, bob = world["alice"], world["bob"]
    bobs = {n: i["InstanceId"] for n, i in instances(bob, "hygc").items()}
    result = run("teardown.yml", "-e", "cluster_name=all_mine", "-e", "confirm=yes", "-e", TWO_REGIONS, env=alice,
                 name="hygiene-all-mine")
    asked = result.output[result.output.index("Ask before removing]"):]
    assert asked.split("TASK [", 1)[0].count("skipping: [localhost]") == 1, "confirm=yes must not ask"
    for cluster, region in (("hyga", EU), ("hygb", US), ("hygold", EU)):
        env = in_region(alice, region)
        assert leftovers(env, cluster) == nothing_left(env, cluster), cluster
        assert tagged_volumes(env, cluster) == [], cluster
        assert not (ROOT / ".clusters" / cluster).exists()
    # Bob's cluster and leftover are untouched.
    assert {n: i["InstanceId"] for n, i in instances(bob, "hygc").items()} == bobs
    assert tagged_volumes(in_region(bob, US), "hygbob") == [world["left"]["hygbob"]["volume"]]
    # Nothing of Alice's is left anywhere; a second run finds nothing and changes nothing.
    again = run("teardown.yml", "-e", "cluster_name=all_mine", "-e", TWO_REGIONS, env=alice,
                name="hygiene-all-mine-again")
    assert f"Nothing of {world['users']['alice']['arn']} to remove." in again.output
    assert again.changed == 0, again.changed_tasks()


# IAM actions of our own modules (plugins/modules), from their code.
OWN_MODULE_ACTIONS = {
    "dask_ec2_cost": {"pricing:GetProducts"},
    "dask_ec2_launch": {"ec2:DescribeInstances", "ec2:DescribeSubnets", "ec2:RunInstances", "ec2:TerminateInstances",
                        "ec2:StartInstances", "ec2:CreateTags", "ec2:DeleteTags"},
    "dask_ec2_status": {"ec2:DescribeInstances", "ec2:DescribeSecurityGroups", "ec2:DescribeKeyPairs",
                        "ec2:DescribeVolumes", "ec2:DescribeLaunchTemplates", "pricing:GetProducts",
                        "iam:GetRolePolicy"},
    # HeadBucket (S3 names the region even when it refuses it) and GetBucketLocation when it did not.
    "dask_ec2_bucket_regions": {"s3:GetBucketLocation"},
    # Runs on the cluster's machines and writes a local file there: no AWS call.
    "dask_ec2_stamp": set(),
    # Runs on the controller over a tree just saved from the cluster: no AWS call.
    "dask_ec2_inert": set(),
}


def test_iam_policy_allows_what_our_own_modules_call():
    policy = json.loads((ROOT / "iam" / "dask-ec2-ansible-policy.json").read_text())
    allowed = set()
    for statement in policy["Statement"]:
        allowed |= {statement["Action"]} if isinstance(statement["Action"], str) else set(statement["Action"])
    modules = {p.stem for p in (ROOT / "plugins" / "modules").glob("*.py")}
    assert modules == set(OWN_MODULE_ACTIONS), "a module without a known IAM footprint"
    assert set().union(*OWN_MODULE_ACTIONS.values()) <= allowed


def test_price_table_is_dated_and_covers_the_defaults():
    assert str(PRICES["as_of"]) >= "2025-01-01" and PRICES["currency"] == "USD"
    for region, types in PRICES["instances"].items():
        assert region in PRICES["gp3_gib_month"], region
        assert {"t3.large", "m6i.large"} <= set(types), region  # scheduler_instance_type, worker_instance_type
        assert all(0 < price < 10 for price in types.values()), region
