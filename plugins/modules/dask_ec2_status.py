#!/usr/bin/python
# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Every cluster and every leftover of dask-ec2-ansible, in many regions at once."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dask_ec2_status
short_description: Find the clusters and leftover resources of dask-ec2-ansible in several regions
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Reads, in every region of O(regions) in parallel (one thread per region, up to 16), the
    instances, security groups, key pairs, volumes and launch templates tagged
    C(dask-ec2-ansible:created-by=dask-ec2-ansible).
  - A cluster is the live instances (pending, running, stopping, stopped) of one
    C(dask-ec2-ansible:cluster) tag in one region. A leftover is a security group, key pair or
    launch template of a cluster without live instances, or any unattached volume.
  - Prices each cluster per hour (running machines and their volumes) and since its machines
    started, through the Price List API or the shipped price table (see dask_ec2_cost).
  - Names the S3 buckets each cluster's own role (s3_read_buckets, s3_write_buckets) lets its
    machines read and write, from the role's policy in IAM (C(iam:GetRolePolicy)).
  - Read-only; never changes anything, also not in check mode.
options:
  regions:
    description: Regions to look in.
    type: list
    elements: str
    required: true
  owner:
    description: The caller's ARN; clusters and leftovers whose owner tag is this are marked C(mine).
    type: str
    default: ""
  price_table:
    description: The shipped price table (roles/provider_aws/files/ec2_prices.yml).
    type: dict
    required: true
  price_list_api:
    description: Ask the Price List API first; false uses the table only.
    type: bool
    default: true
  clusters_dir:
    description:
      - Where the clusters made on this machine keep their state (C(.clusters)); the scaling limits and the
        starting mode in each one's C(cluster.json) are reported beside what EC2 says. Empty reads none.
    type: path
    default: ""
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Find every cluster and leftover in two regions, marking the caller's
  dask_ec2_ansible.cluster.dask_ec2_status:
    regions: [eu-west-1, us-east-1]
    owner: "{{ caller.arn }}"
    price_table: "{{ lookup('ansible.builtin.file', 'roles/provider_aws/files/ec2_prices.yml') | from_yaml }}"
  register: status

- name: Show them as a table
  ansible.builtin.debug:
    msg: "{{ status.table }}"
"""

RETURN = r"""
clusters:
  description:
    - One entry per cluster and region, sorted by region and name.
    - C(s3_buckets) holds the C(read) and C(write) locations of its own role (empty lists without
      one), null when IAM did not answer.
    - C(autoscaled_workers) counts the running workers its autoscaler started; C(scaling) holds the C(minimum),
      C(maximum) and starting C(mode) (fixed, manual or adaptive) from its cluster.json in O(clusters_dir), null
      when it is not there.
  type: list
  elements: dict
  returned: always
leftovers:
  description: Resources of ours that belong to no live cluster, and unattached volumes.
  type: list
  elements: dict
  returned: always
mine:
  description:
    - The clusters (live or only leftovers) where every resource tagged with the cluster carries the owner tag
      O(owner), which is what C(teardown.yml -e cluster_name=all_mine) removes. A cluster with any resource of another
      owner, or without an owner tag, is never in it.
  type: list
  elements: dict
  returned: always
generated:
  description: When the regions were read (UTC, ISO 8601).
  type: str
  returned: always
owner:
  description: O(owner), as given.
  type: str
  returned: always
errors:
  description: Regions that could not be read, with the reason.
  type: dict
  returned: always
table:
  description: The same, as lines of text for a terminal.
  type: list
  elements: str
  returned: always
"""

import concurrent.futures
import datetime
import json
import os
import urllib.parse

try:
    import botocore
except ImportError:
    pass  # AnsibleAWSModule says that boto3 is missing

from ansible_collections.dask_ec2_ansible.cluster.plugins.module_utils.dask_ec2_pricing import (
    HOURS_PER_MONTH, PRICE_LIST_REGION, SPOT_NOTE, PriceBook, pricing_config,
)
from ansible_collections.dask_ec2_ansible.cluster.plugins.module_utils.dask_ec2_retry import READ_RETRIES, error_code
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule

PREFIX = "dask-ec2-ansible:"
OURS = [{"Name": f"tag:{PREFIX}created-by", "Values": ["dask-ec2-ansible"]}]
LIVE = ["pending", "running", "stopping", "stopped"]
BILLED = ("pending", "running")


def _tags(resource):
    return {t["Key"]: t["Value"] for t in resource.get("Tags", []) or []}


def _iso(when):
    return when.isoformat() if when else None


def _scan(client):
    """Everything of ours in one region (the client's)."""
    def pages(method, key, **kwargs):
        return [item for page in client.get_paginator(method).paginate(**kwargs) for item in page[key]]
    instances = [i for r in pages("describe_instances", "Reservations",
                                  Filters=OURS + [{"Name": "instance-state-name", "Values": LIVE}])
                 for i in r["Instances"]]
    return {
        "instances": instances,
        "security_groups": pages("describe_security_groups", "SecurityGroups", Filters=OURS),
        "key_pairs": client.describe_key_pairs(Filters=OURS)["KeyPairs"],
        "volumes": pages("describe_volumes", "Volumes", Filters=OURS),
        "launch_templates": pages("describe_launch_templates", "LaunchTemplates", Filters=OURS),
    }


def _hours(since, now):
    return max((now - since).total_seconds() / 3600, 0.0) if since else 0.0


def _age(hours):
    minutes = int(hours * 60)
    if minutes < 60:
        return f"{minutes}m"
    if minutes < 24 * 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes // 1440}d{minutes % 1440 // 60:02d}h"


def _short_owner(arn, me):
    if not arn:
        return "(no owner tag)"
    short = arn.split(":", 5)[-1] if arn.count(":") >= 5 else arn
    return short + (" (you)" if arn == me else "")


def _clusters(region, found, book, me, now):
    by_name = {}
    for inst in found["instances"]:
        tags = _tags(inst)
        by_name.setdefault(tags.get(PREFIX + "cluster", "(untagged)"), []).append((inst, tags))
    volumes = {}
    for vol in found["volumes"]:
        for att in vol.get("Attachments", []):
            volumes.setdefault(att["InstanceId"], []).append(vol)
    clusters = []
    for name, members in sorted(by_name.items()):
        types, roles, by_role, states, owners, user_tags = {}, {}, {}, {}, set(), {}
        hourly, so_far, sources, missing, spot, launched, gib = 0.0, 0.0, set(), [], 0, None, 0
        autoscaled = 0
        fallback = []
        storage, storage_source = book.storage_gib_hour(region)
        for inst, tags in members:
            itype, state = inst["InstanceType"], inst["State"]["Name"]
            role = tags.get(PREFIX + "role", "?")
            types[itype] = types.get(itype, 0) + 1
            roles[role] = roles.get(role, 0) + 1
            by_role.setdefault(role, {}).setdefault(itype, 0)
            by_role[role][itype] += 1
            states[state] = states.get(state, 0) + 1
            if tags.get(PREFIX + "autoscaled") == "true" and state in ("pending", "running"):
                autoscaled += 1
            owners.add(tags.get(PREFIX + "owner", ""))
            if role == "scheduler" or not user_tags:
                user_tags = {k: v for k, v in tags.items() if not k.startswith(PREFIX) and k != "Name"}
            # moto (and a launch template) may not report InstanceLifecycle: our tag says it too.
            if inst.get("InstanceLifecycle") == "spot" or tags.get(PREFIX + "lifecycle") == "spot":
                spot += 1
            elif tags.get(PREFIX + "spot-fallback") == "true":
                fallback.append(tags.get("Name", inst["InstanceId"]))
            launched = min(launched, inst["LaunchTime"]) if launched else inst["LaunchTime"]
            if state in BILLED:
                price, source = book.instance(region, itype)
                if price is None:
                    missing.append(f"{itype} in {region}")
                else:
                    hourly += price
                    so_far += price * _hours(inst["LaunchTime"], now)
                    sources.add(source)
            for vol in volumes.get(inst["InstanceId"], []):
                gib += vol["Size"]
                if storage is None:
                    missing.append(f"gp3 storage in {region}")
                else:
                    hourly += vol["Size"] * storage
                    so_far += vol["Size"] * storage * _hours(vol.get("CreateTime"), now)
                    sources.add(storage_source)
        owners_list = sorted(owners)
        clusters.append({
            "name": name, "region": region, "owners": owners_list,
            "mine": bool(me) and owners_list == [me],
            "tags": user_tags,
            "instances": roles, "instance_types": types, "machines": by_role, "states": states, "spot_instances": spot,
            "autoscaled_workers": autoscaled,
            "on_demand_fallback": sorted(fallback),
            "volumes_gib": gib,
            "monthly_storage_usd": None if storage is None else round(gib * storage * HOURS_PER_MONTH, 2),
            "stopped": set(states) <= {"stopping", "stopped"},
            "launched": _iso(launched), "age_hours": round(_hours(launched, now), 2),
            "hourly_usd": None if missing else round(hourly, 4),
            "cost_so_far_usd": None if missing else round(so_far, 2),
            "missing_prices": sorted(set(missing)), "price_sources": sorted(sources),
        })
    return clusters


def _leftovers(region, found, live_clusters, book, me, now):
    left = []

    def add(kind, rid, name, tags, created=None, monthly=None, size=None):
        owner = tags.get(PREFIX + "owner", "")
        left.append({"kind": kind, "region": region, "id": rid, "name": name,
                     "cluster": tags.get(PREFIX + "cluster", ""), "owner": owner, "mine": bool(me) and owner == me,
                     "created": _iso(created), "age_hours": round(_hours(created, now), 2) if created else None,
                     "size_gib": size, "monthly_usd": monthly})

    def orphan(tags):
        return tags.get(PREFIX + "cluster", "") not in live_clusters
    for group in found["security_groups"]:
        tags = _tags(group)
        if orphan(tags):
            add("security group", group["GroupId"], group["GroupName"], tags)
    for key in found["key_pairs"]:
        tags = _tags(key)
        if orphan(tags):
            add("key pair", key.get("KeyPairId", key["KeyName"]), key["KeyName"], tags, key.get("CreateTime"))
    for template in found["launch_templates"]:
        tags = _tags(template)
        if orphan(tags):
            add("launch template", template["LaunchTemplateId"], template["LaunchTemplateName"], tags,
                template.get("CreateTime"))
    storage = book.storage_gib_hour(region)[0]
    for vol in found["volumes"]:
        if vol["State"] == "available":
            tags = _tags(vol)
            monthly = None if storage is None else round(vol["Size"] * storage * HOURS_PER_MONTH, 2)
            add("volume", vol["VolumeId"], tags.get("Name", ""), tags, vol.get("CreateTime"), monthly, vol["Size"])
    return left


def _mine(region, found, me):
    """The clusters of this region where everything tagged with the cluster is the caller's."""
    owners, kinds = {}, {}
    for kind, key in (("instance", "instances"), ("security group", "security_groups"), ("key pair", "key_pairs"),
                      ("volume", "volumes"), ("launch template", "launch_templates")):
        for resource in found[key]:
            tags = _tags(resource)
            name = tags.get(PREFIX + "cluster")
            if name:
                owners.setdefault(name, set()).add(tags.get(PREFIX + "owner", ""))
                kinds.setdefault(name, {}).setdefault(kind, 0)
                kinds[name][kind] += 1
    return [{"region": region, "name": name, "live": "instance" in kinds[name], "resources": kinds[name]}
            for name in sorted(owners) if me and owners[name] == {me}]


def _money(value, digits):
    return "?" if value is None else f"{value:.{digits}f}"


def _table(rows, header):
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]


def _buckets(iam, cluster, region):
    """What the cluster's own role (s3_read_buckets / s3_write_buckets) lets its machines reach:
    {'read': [...], 'write': [...]}, empty lists without one, None when IAM would not say."""
    try:
        document = iam.get_role_policy(RoleName=f"dask-{cluster}-{region}", PolicyName="s3-buckets")["PolicyDocument"]
    except botocore.exceptions.ClientError as error:
        return {"read": [], "write": []} if error_code(error) == "NoSuchEntity" else None
    except botocore.exceptions.BotoCoreError:
        return None
    if isinstance(document, str):  # URL-encoded JSON, as IAM's API returns it to some clients
        document = json.loads(urllib.parse.unquote(document))
    reach = {"read": [], "write": []}
    for statement in document.get("Statement", []):
        kind = {"Read": "read", "Write": "write"}.get(statement.get("Sid"))
        resources = statement.get("Resource", [])
        for resource in [resources] if isinstance(resources, str) else resources:
            if kind:
                reach[kind].append(resource.removeprefix("arn:aws:s3:::").removesuffix("*").rstrip("/"))
    return reach


def _scaling(clusters_dir, name):
    """The limits and starting mode a cluster made on this machine has (its cluster.json), or None."""
    if not clusters_dir:
        return None
    try:
        with open(os.path.join(clusters_dir, name, "cluster.json")) as handle:
            info = json.load(handle)
    except (OSError, ValueError):
        return None
    scaling = info.get("scaling") or {}
    if info.get("provider") != "aws" or not scaling:
        return None
    minimum = int(scaling.get("minimum", info.get("workers", 0)))
    return {"minimum": minimum, "maximum": int(scaling.get("maximum", minimum)),
            "mode": ("adaptive" if scaling.get("adaptive") else "manual") if scaling.get("autoscaler") else "fixed"}


def _scaling_cell(c):
    """SCALING: the limits and starting mode from cluster.json (when it is on this machine), and the workers
    the autoscaler runs now (from EC2)."""
    scaling, autoscaled = c.get("scaling"), c.get("autoscaled_workers", 0)
    cell = "?" if scaling is None else (
        "fixed" if scaling["mode"] == "fixed" else f"{scaling['mode']} {scaling['minimum']}-{scaling['maximum']}")
    return cell + (f", {autoscaled} autoscaled" if autoscaled else "")


def _report(clusters, leftovers, errors, regions, book, me):
    lines = [f"Looked in {len(regions)} region(s): {', '.join(regions)}."]
    if clusters:
        rows = []
        for c in clusters:
            machines = " + ".join(f"{n} {role}{'s' if n > 1 else ''} {itype}" for role, types in sorted(c["machines"].items())
                                  for itype, n in sorted(types.items()))
            states = ",".join(sorted(c["states"]))
            capacity = ([f"{c['spot_instances']} spot"] if c["spot_instances"] else []) + (
                [f"on demand, spot refused: {', '.join(c['on_demand_fallback'])}"] if c["on_demand_fallback"] else [])
            rows.append([c["name"], c["region"], machines + (f" ({'; '.join(capacity)})" if capacity else ""),
                         _scaling_cell(c), states, _age(c["age_hours"]), ", ".join(_short_owner(o, me) for o in c["owners"]),
                         ",".join(f"{k}={v}" for k, v in sorted(c["tags"].items())) or "-",
                         _money(c["hourly_usd"], 4), _money(c["cost_so_far_usd"], 2)])
        lines += ["", f"Clusters ({len(clusters)}):"]
        lines += _table(rows, ["CLUSTER", "REGION", "MACHINES", "SCALING", "STATE", "AGE", "OWNER", "TAGS", "USD/HOUR",
                               "USD SO FAR"])
        if any(c.get("scaling") is None for c in clusters):
            lines.append("SCALING ?: the cluster was not made from this machine (no .clusters/NAME/cluster.json here).")
        for c in clusters:
            if c["stopped"]:
                lines.append(f"Stopped: {c['name']} ({c['region']}) keeps {c['volumes_gib']} GiB of disk with its notebooks,"
                             f" about ${_money(c['monthly_storage_usd'], 2)} per month and no machine hours. site.yml"
                             f" -e cluster_name={c['name']} starts it again; teardown.yml saves its notebooks, then"
                             " removes it.")
        for c in clusters:
            reach = c.get("s3_buckets")
            if reach is None:
                lines.append(f"S3: {c['name']} ({c['region']}): unknown (IAM did not answer iam:GetRolePolicy).")
            elif reach["read"] or reach["write"]:
                lines.append(f"S3: {c['name']} ({c['region']}) reads {', '.join(reach['read'] + reach['write'])}"
                             + (f"; writes {', '.join(reach['write'])}" if reach["write"] else "") + ".")
        known = [c["hourly_usd"] for c in clusters if c["hourly_usd"] is not None]
        lines.append(f"Together: about ${sum(known):.4f} per hour"
                     + (" (not counting clusters without a known price)" if len(known) < len(clusters) else "") + ".")
    else:
        lines += ["", "No clusters of dask-ec2-ansible."]
    if leftovers:
        rows = [[item["kind"], item["region"], item["id"], item["name"] or "-", item["cluster"] or "-",
                 _short_owner(item["owner"], me), _age(item["age_hours"]) if item["age_hours"] is not None else "-",
                 _money(item["monthly_usd"], 2) if item["kind"] == "volume" else "-"] for item in leftovers]
        lines += ["", f"Left behind ({len(leftovers)}; not part of a live cluster):"]
        lines += _table(rows, ["LEFTOVER", "REGION", "ID", "NAME", "CLUSTER", "OWNER", "AGE", "USD/MONTH"])
        lines.append("Remove a cluster's: ansible-playbook teardown.yml -e cluster_name=NAME (with AWS_REGION=its region);"
                     " all of yours: -e cluster_name=all_mine.")
    else:
        lines += ["", "Nothing left behind."]
    unknown = sorted({m for c in clusters for m in c["missing_prices"]})
    if unknown:
        lines.append(f"No price known for: {', '.join(unknown)} (not in the price table; the Price List API did not answer).")
    used = sorted({s for c in clusters for s in c["price_sources"]})
    if used:
        lines.append("Prices: " + "; ".join(used) + ("" if book.api_error is None else
                     f". The Price List API was not used ({book.api_error})") + ".")
        lines.append("Estimates: on-demand Linux prices; USD so far counts since each machine last started."
                     + (" " + SPOT_NOTE[0].upper() + SPOT_NOTE[1:] + "." if any(c["spot_instances"] for c in clusters) else ""))
    for region, error in sorted(errors.items()):
        lines.append(f"Could not read {region}: {error}")
    return lines


def main():
    module = AnsibleAWSModule(
        argument_spec=dict(
            regions=dict(type="list", elements="str", required=True),
            owner=dict(type="str", default=""),
            price_table=dict(type="dict", required=True),
            price_list_api=dict(type="bool", default=True),
            clusters_dir=dict(type="path", default=""),
        ),
        supports_check_mode=True,
    )
    regions = sorted(set(module.params["regions"]))
    me = module.params["owner"]
    # Clients are made here, one after another (making them is not thread-safe; using them is).
    # Throttling (RequestLimitExceeded) is retried with backoff, up to 10 attempts.
    clients = {region: module.client("ec2", region=region, config=READ_RETRIES) for region in regions}
    found, errors = {}, {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(16, len(regions)))) as pool:
        futures = {pool.submit(_scan, client): region for region, client in clients.items()}
        for future in concurrent.futures.as_completed(futures):
            region = futures[future]
            try:
                found[region] = future.result()
            except Exception as error:  # noqa: BLE001 - reported per region, the others still count
                errors[region] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    now = datetime.datetime.now(datetime.timezone.utc)
    pricing = module.client("pricing", region=PRICE_LIST_REGION, config=pricing_config()) \
        if module.params["price_list_api"] else None
    book = PriceBook(module.params["price_table"], pricing)
    clusters, leftovers, mine = [], [], []
    for region in sorted(found):
        mine += _mine(region, found[region], me)
        region_clusters = _clusters(region, found[region], book, me, now)
        clusters += region_clusters
    # The buckets each cluster's own role reaches (IAM is global: one client).
    iam = module.client("iam", config=READ_RETRIES) if clusters else None
    for c in clusters:
        c["s3_buckets"] = _buckets(iam, c["name"], c["region"])
        c["scaling"] = _scaling(module.params["clusters_dir"], c["name"])
        leftovers += _leftovers(region, found[region], {c["name"] for c in region_clusters}, book, me, now)
    module.exit_json(
        changed=False, owner=me, generated=now.isoformat(), clusters=clusters, leftovers=leftovers, mine=mine, errors=errors, regions=regions,
        price_api_error=book.api_error,
        table=_report(clusters, leftovers, errors, regions, book, me),
        hourly_usd=round(sum(c["hourly_usd"] or 0 for c in clusters), 4),
    )


if __name__ == "__main__":
    main()
