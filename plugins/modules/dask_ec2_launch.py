#!/usr/bin/python
# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Launch the cluster's missing machines, working around refused capacity within seconds."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dask_ec2_launch
short_description: Launch the missing machines of a dask-ec2-ansible cluster, one instance per name
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Finds the cluster's live instances by their C(Name) tag and launches only the names that are missing,
    so a re-run after a launch that died half-way converges without duplicates.
  - Each machine is tried in order on spot capacity (when O(workers.spot)) in every subnet of O(subnet_ids),
    then on-demand in every subnet. A capacity refusal (C(InsufficientInstanceCapacity), C(Unsupported), ...)
    moves on to the next choice at once, without the minutes of retries that botocore and amazon.aws spend on an
    HTTP 500. A spot quota (C(MaxSpotInstanceCountExceeded), or C(VcpuLimitExceeded) on spot) moves to on-demand.
  - The tags of the instances that already exist are brought to O(tags) (added, changed, others removed; the
    lifecycle tags are kept), as amazon.aws.ec2_instance with purge_tags did.
  - The scheduler is launched with C(InstanceInitiatedShutdownBehavior=stop) (it keeps its disk when idle_shutdown
    powers it off), the workers with C(terminate). An existing instance that is stopped is started again.
  - Throttling (C(RequestLimitExceeded)) is retried with exponential backoff and jitter.
  - When a machine cannot be had anywhere, or an on-demand quota refuses it, the module fails with one message
    that names the limit and what to do, after terminating the instances it launched itself (unless
    O(keep_on_failure)).
  - Instances are tagged at launch (C(Name), O(tags), C(dask-ec2-ansible:role), C(dask-ec2-ansible:lifecycle)
    C(spot) or C(on-demand), and C(dask-ec2-ansible:spot-fallback=true) on a worker asked on spot that runs on-demand); their volumes get O(tags) too.
options:
  scheduler:
    description: The scheduler (launched first, on-demand).
    type: dict
    required: true
    suboptions:
      name:
        description:
          - Name tag.
        type: str
        required: true
      instance_type:
        description:
          - EC2 instance type.
        type: str
        required: true
      image_id:
        description:
          - AMI.
        type: str
        required: true
      volumes:
        description:
          - Block devices as amazon.aws.ec2_instance takes them.
        type: list
        elements: dict
        default: []
      iam_instance_profile:
        description:
          - The scheduler's instance profile (name or ARN) when it is not O(iam_instance_profile) (an autoscaler's).
        type: str
  workers:
    description: The workers, one instance per name.
    type: dict
    required: true
    suboptions:
      names:
        description:
          - Name tags.
        type: list
        elements: str
        required: true
      instance_type:
        description:
          - EC2 instance type.
        type: str
        required: true
      image_id:
        description:
          - AMI.
        type: str
        required: true
      volumes:
        description:
          - Block devices as amazon.aws.ec2_instance takes them.
        type: list
        elements: dict
        default: []
      spot:
        description:
          - Try spot capacity first, on-demand when refused.
        type: bool
        default: false
  cluster_filters:
    description: DescribeInstances filters that find the cluster's live instances (tags and states).
    type: dict
    required: true
  subnet_ids:
    description: Subnets to try, in order; a worker tries the scheduler's subnet first.
    type: list
    elements: str
    required: true
  security_group_ids:
    description:
      - Security groups.
    type: list
    elements: str
    required: true
  key_name:
    description:
      - EC2 key pair.
    type: str
    required: true
  iam_instance_profile:
    description:
      - Instance profile name or ARN; empty for none.
    type: str
    default: ""
  metadata_options:
    description:
      - IMDS options as amazon.aws.ec2_instance takes them.
    type: dict
    default: {}
  tags:
    description:
      - Tags of every instance and volume.
    type: dict
    default: {}
  keep_on_failure:
    description:
      - Keep the instances launched by this call when it fails.
    type: bool
    default: false
  public_ip:
    description: Whether the machines get a public address; unset follows the subnet's default.
    type: bool
  throttle_attempts:
    description:
      - Attempts per request while EC2 throttles.
    type: int
    default: 8
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Launch the scheduler and two spot workers of cluster lab (only the missing ones)
  dask_ec2_ansible.cluster.dask_ec2_launch:
    region: eu-west-1
    scheduler:
      name: dask-lab-scheduler
      instance_type: m7i.large
      image_id: ami-0123456789abcdef0
      volumes:
        - device_name: /dev/xvda
          ebs:
            volume_size: 30
            volume_type: gp3
            delete_on_termination: true
    workers:
      names: [dask-lab-worker-1, dask-lab-worker-2]
      instance_type: m7i.xlarge
      image_id: ami-0123456789abcdef0
      spot: true
    cluster_filters:
      "tag:dask-ec2-ansible:cluster": lab
      instance-state-name: [pending, running, stopping, stopped]
    subnet_ids: [subnet-0aaaaaaaaaaaaaaa1, subnet-0bbbbbbbbbbbbbbb2]
    security_group_ids: [sg-0123456789abcdef0]
    key_name: dask-lab
    tags:
      dask-ec2-ansible:cluster: lab
      dask-ec2-ansible:created-by: dask-ec2-ansible
  register: launch

- name: Show where each machine runs and on which capacity
  ansible.builtin.debug:
    msg: "{{ launch.summary }}"
"""

RETURN = r"""
instances:
  description: One entry per machine (name, role, instance_id, instance_type, lifecycle, subnet_id, availability_zone, launched).
  type: list
  elements: dict
  returned: always
refused:
  description: Every launch request EC2 refused (name, lifecycle, subnet_id, availability_zone, code, message).
  type: list
  elements: dict
  returned: always
on_demand_fallback:
  description: Names of the machines asked on spot that run on-demand.
  type: list
  elements: str
  returned: always
zones:
  description: Availability zone per role (scheduler, workers); the workers' list is sorted.
  type: dict
  returned: always
throttled:
  description: How many requests EC2 throttled (C(RequestLimitExceeded)) and were retried.
  type: int
  returned: always
summary:
  description: Readable lines - where each machine runs, on which capacity, and what EC2 refused on the way.
  type: list
  elements: str
  returned: always
"""

import hashlib
import time

try:
    import botocore
except ImportError:
    pass  # AnsibleAWSModule reports it

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.dask_ec2_ansible.cluster.plugins.module_utils.dask_ec2_retry import (
    CAPACITY, FALLBACK_TAG, LIFECYCLE_TAG, NO_RETRIES, QUOTA, READ_RETRIES, SPOT_MARKET, call_with_backoff,
    error_code, launch_choices, market_tags,
)

ROLE_TAG = "dask-ec2-ansible:role"
LIVE = ["pending", "running", "stopping", "stopped"]


# How long a new instance profile may take to be usable by RunInstances (seconds).
PROFILE_WAIT = 60


def _camel_volume(volume):
    ebs = volume.get("ebs") or {}
    names = {"volume_type": "VolumeType", "volume_size": "VolumeSize", "encrypted": "Encrypted",
             "delete_on_termination": "DeleteOnTermination", "iops": "Iops", "throughput": "Throughput",
             "kms_key_id": "KmsKeyId", "snapshot_id": "SnapshotId"}
    out = {"DeviceName": volume["device_name"]}
    if ebs:
        out["Ebs"] = {names[k]: (int(v) if k in ("volume_size", "iops", "throughput") else v)
                      for k, v in ebs.items() if k in names and v is not None}
    return out


def _metadata(options):
    names = {"http_endpoint": "HttpEndpoint", "http_tokens": "HttpTokens",
             "http_put_response_hop_limit": "HttpPutResponseHopLimit", "instance_metadata_tags": "InstanceMetadataTags"}
    return {names[k]: (int(v) if k == "http_put_response_hop_limit" else v) for k, v in options.items()
            if k in names and v is not None}


def _tags(resource):
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


class Launcher:
    def __init__(self, module):
        self.module = module
        self.p = module.params
        self.read = module.client("ec2", config=READ_RETRIES)
        self.write = module.client("ec2", config=NO_RETRIES)
        self.refused, self.launched, self.throttled = [], [], 0
        self.subnets = {}
        self.over_quota, self.no_capacity, self.skipped = set(), set(), {}
        scheduler, workers = self.p["scheduler"], self.p["workers"]
        self.machines = [dict(scheduler, role="scheduler", spot=False)] + [
            {"name": name, "role": "worker", "instance_type": workers["instance_type"], "image_id": workers["image_id"],
             "volumes": workers["volumes"], "spot": workers["spot"]} for name in workers["names"]]

    def backoff(self, call):
        def count(_code):
            self.throttled += 1
        return call_with_backoff(call, attempts=self.p["throttle_attempts"], on_retry=count)

    def find(self, extra=None):
        filters = dict(self.p["cluster_filters"], **(extra or {}))
        aws_filters = [{"Name": k, "Values": v if isinstance(v, list) else [str(v)]} for k, v in filters.items()]
        pages = self.read.get_paginator("describe_instances").paginate(Filters=aws_filters)
        found = {}
        for page in pages:
            for reservation in page["Reservations"]:
                for inst in reservation["Instances"]:
                    if inst["State"]["Name"] in LIVE:
                        found.setdefault(_tags(inst).get("Name", ""), []).append(inst)
        return found

    def zone_of(self, subnet_id):
        if subnet_id not in self.subnets:
            subnets = self.read.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
            self.subnets[subnet_id] = subnets[0]["AvailabilityZone"] if subnets else "?"
        return self.subnets[subnet_id]

    def describe(self, machine, inst, launched):
        tags = _tags(inst)
        lifecycle = "spot" if inst.get("InstanceLifecycle") == "spot" else tags.get(LIFECYCLE_TAG, "on-demand")
        return {"name": machine["name"], "role": machine["role"], "instance_id": inst["InstanceId"],
                "instance_type": inst["InstanceType"], "lifecycle": lifecycle, "subnet_id": inst.get("SubnetId", ""),
                "availability_zone": inst.get("Placement", {}).get("AvailabilityZone", ""), "launched": launched}

    def retag(self, machine, inst):
        """Bring an existing instance's tags to what a launch now would give it (owner, cluster_tags)."""
        have = _tags(inst)
        want = dict(self.p["tags"], Name=machine["name"], **{ROLE_TAG: machine["role"]})
        keep = {LIFECYCLE_TAG, FALLBACK_TAG}
        add = {k: str(v) for k, v in want.items() if have.get(k) != str(v)}
        drop = [k for k in have if k not in want and k not in keep and not k.startswith("aws:")]
        if (add or drop) and not self.module.check_mode:
            if add:
                self.backoff(lambda: self.read.create_tags(
                    Resources=[inst["InstanceId"]], Tags=[{"Key": k, "Value": v} for k, v in add.items()]))
            if drop:
                self.backoff(lambda: self.read.delete_tags(
                    Resources=[inst["InstanceId"]], Tags=[{"Key": k} for k in drop]))
        return bool(add or drop)

    def request(self, machine, lifecycle, subnet_id):
        # The fallback tag: status tells these apart from workers that were never meant to be spot.
        tags = dict(self.p["tags"], Name=machine["name"], **{ROLE_TAG: machine["role"]},
                    **market_tags(machine["spot"], lifecycle))
        params = {
            "ImageId": machine["image_id"], "InstanceType": machine["instance_type"], "MinCount": 1, "MaxCount": 1,
            "KeyName": self.p["key_name"], "SubnetId": subnet_id, "SecurityGroupIds": self.p["security_group_ids"],
            # idle_shutdown: the scheduler keeps its disk (and notebooks) when it powers itself off; workers go.
            "InstanceInitiatedShutdownBehavior": "stop" if machine["role"] == "scheduler" else "terminate",
            "TagSpecifications": [
                {"ResourceType": "instance", "Tags": [{"Key": k, "Value": str(v)} for k, v in tags.items()]},
                {"ResourceType": "volume", "Tags": [{"Key": k, "Value": str(v)} for k, v in self.p["tags"].items()]},
            ],
            # The same token for the same try: EC2 answers a repeated request with the same instance.
            "ClientToken": hashlib.sha256(f"{machine['name']}|{lifecycle}|{subnet_id}|{self.token_seed}".encode()).hexdigest()[:64],
        }
        if machine.get("volumes"):
            params["BlockDeviceMappings"] = [_camel_volume(v) for v in machine["volumes"]]
        if self.p["metadata_options"]:
            params["MetadataOptions"] = _metadata(self.p["metadata_options"])
        profile = self.p["iam_instance_profile"]
        if machine["role"] == "scheduler" and machine.get("iam_instance_profile") is not None:
            profile = machine["iam_instance_profile"]
        if profile:
            params["IamInstanceProfile"] = {"Arn": profile} if profile.startswith("arn:") else {"Name": profile}
        if self.p["public_ip"] is not None:
            # A network interface of its own says whether it gets a public address, whatever the subnet's default.
            params["NetworkInterfaces"] = [{"DeviceIndex": 0, "SubnetId": params.pop("SubnetId"),
                                            "Groups": params.pop("SecurityGroupIds"),
                                            "AssociatePublicIpAddress": self.p["public_ip"]}]
        if lifecycle == "spot":
            params["InstanceMarketOptions"] = SPOT_MARKET
        return params

    def launch_one(self, machine, subnet_ids):
        """The instance, or (code, message) of the refusal that ends the search."""
        last = None
        for lifecycle, subnet_id in launch_choices(subnet_ids, machine.get("spot")):
            # A quota is per region and market: other subnets would be refused the same; and
            # a zone without capacity now has none for the next machine of this run either.
            if lifecycle in self.over_quota or (lifecycle, subnet_id, machine["instance_type"]) in self.no_capacity:
                last = self.skipped.get((lifecycle, subnet_id, machine["instance_type"])) or self.skipped.get(lifecycle) or last
                continue
            params = self.request(machine, lifecycle, subnet_id)
            attempts, profile_waited = 0, 0
            while attempts < 2:
                attempts += 1
                try:
                    reservation = self.backoff(lambda: self.write.run_instances(**params))
                    inst = reservation["Instances"][0]
                    self.launched.append(inst["InstanceId"])
                    return inst
                except botocore.exceptions.ClientError as error:
                    code, message = error_code(error), error.response.get("Error", {}).get("Message", "")
                    if (code == "InvalidParameterValue" and "instance profile" in message.lower()
                            and profile_waited < PROFILE_WAIT and "IamInstanceProfile" in params):
                        # A profile made moments ago (s3_*_buckets) reaches EC2 seconds later (IAM is
                        # eventually consistent): the same request again, a while.
                        time.sleep(5)
                        profile_waited += 5
                        attempts -= 1
                        continue
                    self.refused.append({"name": machine["name"], "lifecycle": lifecycle, "subnet_id": subnet_id,
                                         "availability_zone": self.zone_of(subnet_id), "code": code, "message": message})
                    if code not in CAPACITY | QUOTA:
                        self.fail(f"EC2 refused to launch {machine['name']} ({machine['instance_type']}, {lifecycle}, "
                                  f"{subnet_id}): {code}: {message}")
                    last = (code, message, lifecycle)
                    if code in QUOTA:
                        self.over_quota.add(lifecycle)
                        self.skipped[lifecycle] = last
                    else:
                        self.no_capacity.add((lifecycle, subnet_id, machine["instance_type"]))
                    self.skipped[(lifecycle, subnet_id, machine["instance_type"])] = last
                    break
                except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError):
                    # The request may have reached EC2: look before asking again (no duplicates).
                    time.sleep(1)
                    existing = self.find({"tag:Name": machine["name"]}).get(machine["name"])
                    if existing:
                        self.launched.append(existing[0]["InstanceId"])
                        return existing[0]
        return last

    def start(self, machine, inst):
        """Start a machine that was stopped (a scheduler after idle_shutdown): its disk holds the user's work."""
        if self.module.check_mode:
            return
        if inst["State"]["Name"] == "stopping":
            self.read.get_waiter("instance_stopped").wait(InstanceIds=[inst["InstanceId"]])
        try:
            self.backoff(lambda: self.write.start_instances(InstanceIds=[inst["InstanceId"]]))
        except botocore.exceptions.ClientError as error:
            self.fail(f"EC2 refused to start the stopped {machine['name']} ({inst['InstanceId']}, {inst['InstanceType']}):"
                      f" {error_code(error)}: {error.response.get('Error', {}).get('Message', '')}. Its disk is kept;"
                      " run site.yml again later, or save its work and remove it with teardown.yml.")

    def fail(self, msg, **extra):
        kept = self.launched if self.p["keep_on_failure"] else []
        if self.launched and not self.p["keep_on_failure"] and not self.module.check_mode:
            self.backoff(lambda: self.read.terminate_instances(InstanceIds=self.launched))
            msg += f" Terminated the {len(self.launched)} instance(s) this run had launched ({', '.join(self.launched)})."
        elif kept:
            msg += f" Kept the {len(kept)} instance(s) this run had launched (keep_on_failure): {', '.join(kept)}."
        self.module.fail_json(msg=msg, refused=self.refused, launched=self.launched, throttled=self.throttled, **extra)

    def run(self):
        self.token_seed = f"{time.time_ns()}"
        existing = self.find()
        results, changed = [], False
        scheduler_subnet = None
        for machine in self.machines:
            have = existing.get(machine["name"])
            if have:
                inst = sorted(have, key=lambda i: i["LaunchTime"])[0]
                changed |= self.retag(machine, inst)
                results.append(self.describe(machine, inst, False))
                if inst["State"]["Name"] in ("stopping", "stopped"):
                    self.start(machine, inst)
                    results[-1]["started"] = changed = True
            elif self.module.check_mode:
                results.append({"name": machine["name"], "role": machine["role"], "instance_id": "",
                                "instance_type": machine["instance_type"], "launched": True,
                                "lifecycle": "spot" if machine.get("spot") else "on-demand",
                                "subnet_id": "", "availability_zone": ""})
                changed = True
                continue
            else:
                subnets = list(self.p["subnet_ids"])
                if machine["role"] != "scheduler" and scheduler_subnet in subnets:
                    subnets.remove(scheduler_subnet)
                    subnets.insert(0, scheduler_subnet)
                got = self.launch_one(machine, subnets)
                if not isinstance(got, dict):
                    self.give_up(machine, got)
                results.append(self.describe(machine, got, True))
                changed = True
            if machine["role"] == "scheduler":
                scheduler_subnet = results[-1]["subnet_id"]
        fallback = [r["name"] for r in results if r["lifecycle"] == "on-demand"
                    and any(m["name"] == r["name"] and m["spot"] for m in self.machines)]
        zones = {"scheduler": sorted({r["availability_zone"] for r in results if r["role"] == "scheduler"}),
                 "workers": sorted({r["availability_zone"] for r in results if r["role"] != "scheduler"})}
        self.module.exit_json(changed=changed, instances=results, refused=self.refused, throttled=self.throttled,
                              on_demand_fallback=fallback, zones=zones,
                              summary=self.summary(results, fallback, zones))

    def summary(self, results, fallback, zones):
        def state(r):
            return "launched now" if r["launched"] else "started again" if r.get("started") else "already there"

        lines = [f"{r['name']}: {r['instance_type']}, {r['lifecycle']}, {r['availability_zone'] or '?'}"
                 f" ({state(r)}{', ' + r['instance_id'] if r['instance_id'] else ''})"
                 for r in results]
        if fallback:
            codes = sorted({r["code"] for r in self.refused if r["lifecycle"] == "spot"})
            lines.append(f"On demand, not spot: {', '.join(fallback)} (spot was refused: {', '.join(codes) or 'earlier run'});"
                         " these cost the on-demand price.")
        if set(zones["workers"]) - set(zones["scheduler"]):
            lines.append(f"The scheduler runs in {', '.join(zones['scheduler'])}, workers in {', '.join(zones['workers'])}:"
                         " traffic between availability zones is billed (about $0.01 per GB each way).")
        if self.refused:
            lines.append(f"EC2 refused {len(self.refused)} launch request(s) on the way: " + "; ".join(
                f"{r['name']} {r['lifecycle']} in {r['availability_zone']}: {r['code']}" for r in self.refused))
        if self.throttled:
            lines.append(f"EC2 throttled {self.throttled} launch request(s); retried with backoff.")
        return lines

    def give_up(self, machine, last):
        code, message, lifecycle = last if last else ("", "no subnet to try", "on-demand")
        itype = machine["instance_type"]
        count = sum(1 for m in self.machines if m["instance_type"] == itype)
        zones = sorted({r["availability_zone"] for r in self.refused if r["name"] == machine["name"]})
        if code in QUOTA:
            what = (f"Your account's quota refused {machine['name']} ({itype}, {lifecycle}): {code}. "
                    f"EC2 said: {message} "
                    "What to do: ask for fewer or smaller machines (worker_count, worker_instance_type, "
                    "scheduler_instance_type), or ask AWS for a higher quota: Service Quotas console, "
                    "'Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances' (vCPUs) for this region, "
                    "or: aws service-quotas request-service-quota-increase --service-code ec2 "
                    "--quota-code L-1216C47A --desired-value N.")
        else:
            what = (f"EC2 has no capacity for {itype} ({machine['name']}) in {', '.join(zones) or 'any zone tried'}"
                    f"{' on spot or on-demand' if machine.get('spot') else ''}: {code}. EC2 said: {message} "
                    "What to do: try another instance type (worker_instance_type / scheduler_instance_type; "
                    "a similar one of another generation, e.g. m7i or m6a for m6i), more subnets in other zones "
                    "(vpc_subnet_ids), another region, or try again later.")
        self.fail(what + f" ({len(self.refused)} launch request(s) refused; {count} machine(s) of {itype} asked.)",
                  limit=code)


def main():
    module = AnsibleAWSModule(
        argument_spec=dict(
            scheduler=dict(type="dict", required=True, options=dict(
                name=dict(type="str", required=True), instance_type=dict(type="str", required=True),
                image_id=dict(type="str", required=True), volumes=dict(type="list", elements="dict", default=[]),
                iam_instance_profile=dict(type="str"))),
            workers=dict(type="dict", required=True, options=dict(
                names=dict(type="list", elements="str", required=True), instance_type=dict(type="str", required=True),
                image_id=dict(type="str", required=True), volumes=dict(type="list", elements="dict", default=[]),
                spot=dict(type="bool", default=False))),
            cluster_filters=dict(type="dict", required=True),
            subnet_ids=dict(type="list", elements="str", required=True),
            security_group_ids=dict(type="list", elements="str", required=True),
            key_name=dict(type="str", required=True),
            iam_instance_profile=dict(type="str", default=""),
            metadata_options=dict(type="dict", default={}),
            tags=dict(type="dict", default={}),
            keep_on_failure=dict(type="bool", default=False),
            public_ip=dict(type="bool"),
            throttle_attempts=dict(type="int", default=8),
        ),
        supports_check_mode=True,
    )
    if not module.params["subnet_ids"]:
        module.fail_json(msg="No subnet to launch into (subnet_ids is empty).")
    launcher = Launcher(module)
    try:
        launcher.run()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
        # Anything unforeseen (an expired session, a throttling that did not pass): still leave nothing behind.
        launcher.fail(f"Launching the machines failed: {type(error).__name__}: {error}")


if __name__ == "__main__":
    main()
