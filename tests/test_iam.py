"""The IAM documents the toolkit ships and makes, read as a cloud-security engineer would (issue 24).

parliament (an offline IAM policy auditor) reads the shipped user policy, the
boundary of every role the toolkit makes, and such a role's own policy and
trust. Its findings that do not apply are listed below with the reason; any
other finding fails. The rules the auditor cannot see (every change only of
the caller's own resources, roles only with the boundary, launches only with
IMDSv2, encrypted volumes and the images we search) are checked here by
reading the statements. moto treats conditions as met, so whether AWS itself
grants exactly this is not proven by any test (docs/aws.md says so)."""

from __future__ import annotations

import importlib.util
import json
import warnings

import pytest
import yaml

from conftest import ROOT

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # parliament imports pkg_resources, which warns of its own removal
    parliament = pytest.importorskip("parliament")

POLICY = json.loads((ROOT / "iam" / "dask-ec2-ansible-policy.json").read_text())
BOUNDARY = json.loads((ROOT / "iam" / "dask-ec2-ansible-machines-boundary.json").read_text())
OWNER_ID = "dask-ec2-ansible:owner-id"
AUTOSCALER_BOUNDARY = json.loads((ROOT / "iam" / "dask-ec2-ansible-autoscaler-boundary.json").read_text())
BOUNDARY_ARN = "arn:aws:iam::${aws:PrincipalAccount}:policy/dask-ec2-ansible/dask-ec2-ansible-machines-boundary"
AUTOSCALER_BOUNDARY_ARN = ("arn:aws:iam::${aws:PrincipalAccount}:policy/dask-ec2-ansible/"
                           "dask-ec2-ansible-autoscaler-boundary")


def cluster_filters():
    spec = importlib.util.spec_from_file_location("cluster_filters", ROOT / "plugins" / "filter" / "cluster.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def findings(document: dict) -> list:
    policy = parliament.analyze_policy_string(json.dumps(document), include_community_auditors=True)
    return policy.findings


def statements(document: dict) -> list[dict]:
    return [{**s, "Action": [s["Action"]] if isinstance(s["Action"], str) else s["Action"],
             "Resource": [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]}
            for s in document["Statement"]]


# parliament's findings on the shipped policy that do not apply, and why.
NOT_APPLYING = {
    # Its privilege-escalation check matches action names only (iam:PassRole and ec2:RunInstances both
    # allowed), whatever their resources. Ours passes only roles under /dask-ec2-ansible/ (checked below),
    # which the policy makes only with the boundary: a machine can get no more than S3 object access.
    "PRIVILEGE_ESCALATION": {"CreateEC2WithExistingIP"},
    # Making, changing and removing the cluster's own role is the feature (s3_*_buckets); each of these
    # actions is limited to our path, the caller's own roles and the boundary (checked below).
    "PERMISSIONS_MANAGEMENT_ACTIONS": None,
    # RunInstances, CreateImage and CreateSecurityGroup act on several resources at once (instance, volume,
    # image, subnet, vpc, ...); each resource type has a statement of its own so that its conditions apply
    # to it alone, and parliament wants every type in every statement.
    "RESOURCE_MISMATCH": {"ec2:RunInstances", "ec2:CreateImage", "ec2:CreateSecurityGroup"},
    # Describe* and the read-only IAM look-ups, which name no resource or any.
    "RESOURCE_STAR": None,
}


def test_parliament_finds_nothing_in_the_shipped_policy_but_what_does_not_apply():
    found = findings(POLICY)
    assert {f.issue for f in found} <= set(NOT_APPLYING), [(f.issue, f.detail, f.location) for f in found]
    for finding in found:
        if finding.issue == "PRIVILEGE_ESCALATION":
            assert finding.location["type"] in NOT_APPLYING["PRIVILEGE_ESCALATION"], finding.location
        if finding.issue == "RESOURCE_MISMATCH":
            assert {m["action"] for m in finding.detail} <= NOT_APPLYING["RESOURCE_MISMATCH"], finding.detail
        if finding.issue == "RESOURCE_STAR":
            (read_only,) = [s for s in statements(POLICY) if s["Sid"] == "ReadOnlyLookups"]
            assert set(finding.detail) <= set(read_only["Action"]), finding.detail


def test_parliament_finds_nothing_in_the_roles_the_toolkit_makes():
    """The cluster's own role: its S3 policy for some buckets and prefixes, and its trust (EC2 only)."""
    filters = cluster_filters()
    role_policy = filters.s3_access_policy(["data-a/raw", "s3://public-b"], ["results-c", "d/out/"])
    assert [(f.issue, f.detail) for f in findings(role_policy)] == []
    trust = yaml.safe_load((ROOT / "roles" / "provider_aws" / "vars" / "main.yml").read_text())["__provider_aws_ec2_trust"]
    assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                                   "Action": "sts:AssumeRole"}]
    # The boundary: object access only, no IAM, no EC2, nothing that changes a bucket itself.
    boundary_findings = findings(BOUNDARY)
    assert {f.issue for f in boundary_findings} <= {"RESOURCE_STAR"}, [(f.issue, f.detail) for f in boundary_findings]
    (allowed,) = statements(BOUNDARY)
    assert set(allowed["Action"]) == {"s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", "s3:PutObject",
                                      "s3:DeleteObject", "s3:AbortMultipartUpload"}
    # Every action a role's policy can hold is inside the boundary (else the role could not use it).
    granted = {a for s in statements(role_policy) for a in s["Action"]}
    assert granted <= set(allowed["Action"]), granted - set(allowed["Action"])


def test_the_autoscalers_role_may_only_start_tag_and_stop_its_clusters_workers_within_its_boundary():
    """The scheduler's machine carries it (scale_maximum above worker_count): RunInstances only for instances
    tagged with this cluster as autoscaled, of the workers' type, from its image, group and key; tags at launch;
    Name and Terminate only of this cluster's autoscaled workers. Its boundary: the machines' S3 access, those
    EC2 actions and PassRole of our roles, nothing else."""
    variables = yaml.safe_load((ROOT / "roles" / "provider_aws" / "vars" / "main.yml").read_text())
    assert "__provider_aws_autoscaler_policy" in variables
    env = __import__("jinja2").Environment()
    env.filters["bool"] = lambda value: value is True or str(value).lower() in ("true", "yes", "1")
    values = {"__provider_aws_ec2_arn": "arn:aws:ec2:eu-west-1", "__provider_aws_partition": "aws",
              "__provider_aws_caller_result": {"account": "123456789012", "arn": "arn:aws:iam::123456789012:user/u"},
              "provider_aws_cluster_name": "lab", "provider_aws_worker_instance_type": "m7i.large",
              "provider_aws_region": "eu-west-1", "__provider_aws_amis": {"x86_64": {"image_id": "ami-0123"}},
              "__provider_aws_arch": {"worker": "x86_64"}, "__provider_aws_group_result": {"group_id": "sg-0abc"},
              "__provider_aws_key_name": "dask-lab", "__provider_aws_iam_path": "/dask-ec2-ansible/",
              "__provider_aws_role_name": "dask-lab-eu-west-1", "__provider_aws_s3_wanted": True,
              "provider_aws_spot": True}
    template = env.from_string(variables["__provider_aws_autoscaler_policy"]["Statement"])
    policy = {"Version": "2012-10-17", "Statement": __import__("ast").literal_eval(template.render(**values).strip())}
    # aws_spot: its workers are asked on spot first, which RunInstances authorizes on a spot request too.
    on_demand = __import__("ast").literal_eval(template.render(**dict(values, provider_aws_spot=False)).strip())
    spot_request = "arn:aws:ec2:eu-west-1:*:spot-instances-request/*"
    assert {s["Sid"]: s["Resource"] for s in statements(policy)}["FromTheClustersImageNetworkAndKey"][-1] == spot_request
    assert spot_request not in json.dumps(on_demand)
    # The same findings that do not apply to the shipped policy, for the same reasons (NOT_APPLYING): PassRole
    # with RunInstances (of our bucket role only), RunInstances's resources in statements of their own.
    found = findings(policy)
    assert {f.issue for f in found} <= set(NOT_APPLYING), [(f.issue, f.detail) for f in found]
    for finding in found:
        if finding.issue == "RESOURCE_MISMATCH":
            assert {m["action"] for m in finding.detail} == {"ec2:RunInstances"}, finding.detail
    by_sid = {s["Sid"]: s for s in statements(policy)}
    assert conditions(by_sid["LaunchOnlyThisClustersWorkers"]) == {
        "aws:RequestTag/dask-ec2-ansible:cluster": "lab", "aws:RequestTag/dask-ec2-ansible:autoscaled": "true",
        "ec2:InstanceType": "m7i.large"}
    assert conditions(by_sid["NameAndStopOnlyItsOwnWorkers"]) == {
        "aws:ResourceTag/dask-ec2-ansible:cluster": "lab", "aws:ResourceTag/dask-ec2-ansible:autoscaled": "true"}
    assert conditions(by_sid["TagWhatItLaunches"]) == {"ec2:CreateAction": "RunInstances"}
    assert [s["Sid"] for s in statements(policy) if s["Resource"] == ["*"]] == ["SeeTheInstancesAndSubnets"]
    assert all(a.startswith(("ec2:Describe",)) for a in by_sid["SeeTheInstancesAndSubnets"]["Action"])
    assert by_sid["GiveItsWorkersTheClustersBucketRole"]["Resource"] == [
        "arn:aws:iam::123456789012:role/dask-ec2-ansible/dask-lab-eu-west-1"]
    # Its boundary: the machines' own, and exactly what the policy above (and the S3 one) may use.
    boundary = {a for s in statements(AUTOSCALER_BOUNDARY) for a in s["Action"]}
    machines = {a for s in statements(BOUNDARY) for a in s["Action"]}
    granted = {a for s in statements(policy) for a in s["Action"]}
    assert granted <= boundary and machines <= boundary
    assert boundary - machines == granted - machines
    # A boundary grants nothing by itself; PassRole is there for the bucket role only (the policy's resource).
    assert {f.issue for f in findings(AUTOSCALER_BOUNDARY)} <= {"RESOURCE_STAR", "PRIVILEGE_ESCALATION",
                                                                "PERMISSIONS_MANAGEMENT_ACTIONS"}


def conditions(statement: dict) -> dict:
    return {key: value for test in statement.get("Condition", {}).values() for key, value in test.items()}


# Statements that change something yet are not conditioned on the caller's owner tag, and why.
NOT_OWNER_SCOPED = {
    # Tags only while a resource is created; the create statements require the caller's owner-id tag.
    "TagWhileCreating": "ec2:CreateAction",
    # The account's subnets and VPCs are used, not changed, by a launch and a new security group.
    "LaunchIntoTheAccountsNetworks": None,
    # An image is used, not changed: only the owners we search, or the account's own (baked images).
    "LaunchFromTheImagesWeSearchOrTheAccountsOwn": "ec2:Owner",
    # ec2_ami tags an image after it exists (the tag cannot be required); CreateImage itself needs the
    # caller's own instance (BakeImagesOfTheCallersMachinesOnly).
    "BakeImagesAndTagThem": None,
    # Only roles under our path, to EC2 only; they are made only with the boundary.
    "GiveTheMachinesOnlyOurRoles": "iam:PassedToService",
}
READ_ONLY = ("Describe", "Get", "List")


def test_every_statement_that_changes_something_is_the_callers_own():
    for statement in statements(POLICY):
        assert statement["Effect"] == "Allow"
        if all(a.split(":")[1].startswith(READ_ONLY) for a in statement["Action"]):
            continue
        if statement["Sid"] in NOT_OWNER_SCOPED:
            wanted = NOT_OWNER_SCOPED[statement["Sid"]]
            assert wanted is None or wanted in conditions(statement), statement
            continue
        owner = {key: value for key, value in conditions(statement).items() if key.endswith(f"Tag/{OWNER_ID}")}
        assert owner and set(owner.values()) == {"${aws:userid}"}, statement["Sid"]


def test_launches_need_imdsv2_encrypted_volumes_and_the_images_we_search():
    launch = [s for s in statements(POLICY) if "ec2:RunInstances" in s["Action"]]
    by_resource = {}
    for statement in launch:
        for resource in statement["Resource"]:
            by_resource.setdefault(resource.split(":")[-1].split("/")[0], []).append(conditions(statement))
    assert by_resource["instance"] == [
        {"aws:RequestTag/dask-ec2-ansible:created-by": "dask-ec2-ansible",
         f"aws:RequestTag/{OWNER_ID}": "${aws:userid}", "ec2:MetadataHttpTokens": "required"}]
    assert [c["ec2:Encrypted"] for c in by_resource["volume"]] == ["true"]
    # Security groups, key pairs and launch templates: only the caller's own (created-by + owner-id).
    for kind in ("security-group", "key-pair", "launch-template"):
        assert by_resource[kind] == [{"aws:ResourceTag/dask-ec2-ansible:created-by": "dask-ec2-ansible",
                                      f"aws:ResourceTag/{OWNER_ID}": "${aws:userid}"}], kind
    # Images: every owner provider_aws searches, and the account's own; no one else's.
    images = yaml.safe_load((ROOT / "roles" / "provider_aws" / "defaults" / "main.yml").read_text())["provider_aws_images"]
    searched = {owner for image in images.values() for owner in image["owners"]}
    (owners,) = [c["ec2:Owner"] for c in by_resource["image"]]
    assert set(owners) == searched | {"amazon", "${aws:PrincipalAccount}"}


def test_roles_are_passed_and_made_only_under_our_path_and_with_the_boundary():
    iam = [s for s in statements(POLICY) if any(a.startswith("iam:") for a in s["Action"])]
    for statement in iam:
        assert all(r.startswith(("arn:aws:iam::*:role/dask-ec2-ansible/", "arn:aws:iam::*:instance-profile/dask-ec2-ansible/"))
                   for r in statement["Resource"]) or statement["Sid"] == "ReadOnlyLookups", statement
    (passing,) = [s for s in iam if "iam:PassRole" in s["Action"]]
    assert passing["Action"] == ["iam:PassRole"] and passing["Resource"] == ["arn:aws:iam::*:role/dask-ec2-ansible/*"]
    assert conditions(passing) == {"iam:PassedToService": "ec2.amazonaws.com"}
    # Making a role, and giving it a policy, only with the boundary.
    for action in ("iam:CreateRole", "iam:PutRolePolicy", "iam:DeleteRolePolicy", "iam:PutRolePermissionsBoundary"):
        (statement,) = [s for s in iam if action in s["Action"]]
        assert statement["Condition"]["ArnEquals"] == {
            "iam:PermissionsBoundary": [BOUNDARY_ARN, AUTOSCALER_BOUNDARY_ARN]}, action
    assert not any("iam:DeleteRolePermissionsBoundary" in s["Action"] or "iam:AttachRolePolicy" in s["Action"]
                   for s in iam)
    # provider_aws makes its role with that boundary, by the same name.
    variables = (ROOT / "roles" / "provider_aws" / "vars" / "main.yml").read_text()
    assert "policy/dask-ec2-ansible/dask-ec2-ansible-machines-boundary" in variables
    assert "boundary: \"{{ __provider_aws_role_boundary }}\"" in (
        ROOT / "roles" / "provider_aws" / "tasks" / "provision.yml").read_text()
