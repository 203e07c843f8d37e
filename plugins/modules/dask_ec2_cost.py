#!/usr/bin/python
# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Estimate what a planned cluster costs per hour."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dask_ec2_cost
short_description: Estimate the hourly cost of EC2 machines (on-demand, Linux) and their gp3 volumes
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Asks the AWS Price List API (C(pricing:GetProducts), endpoint in us-east-1) for each instance
    type and region; where it does not answer (no network, no permission, an emulator), uses the
    dated price table given in O(price_table) and says so.
  - Spot machines are priced at the on-demand price, the most they can cost.
  - Read-only; never changes anything, also not in check mode.
options:
  machines:
    description: Machine groups to price.
    type: list
    elements: dict
    required: true
    suboptions:
      region:
        description:
          - Region of the machines.
        type: str
        required: true
      instance_type:
        description:
          - EC2 instance type.
        type: str
        required: true
      count:
        description:
          - How many.
        type: int
        default: 1
      volume_gib:
        description:
          - Root volume (gp3) of each, in GiB.
        type: int
        default: 0
      spot:
        description:
          - On spot capacity.
        type: bool
        default: false
      role:
        description:
          - What they are for (shown in the lines).
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
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.region.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Estimate what a cluster of one scheduler and 4 spot workers costs per hour
  dask_ec2_ansible.cluster.dask_ec2_cost:
    machines:
      - {region: eu-west-1, instance_type: t3.large, volume_gib: 30, role: scheduler}
      - {region: eu-west-1, instance_type: m6i.large, count: 4, volume_gib: 30, spot: true, role: workers}
    price_table: "{{ lookup('ansible.builtin.file', 'roles/provider_aws/files/ec2_prices.yml') | from_yaml }}"
  register: cost

- name: Show it
  ansible.builtin.debug:
    msg: "about ${{ cost.hourly_usd }} per hour ({{ cost.sources | join('; ') }})"
"""

RETURN = r"""
hourly_usd:
  description:
    - Estimated USD per hour, null when a price is unknown.
  type: float
  returned: always
monthly_usd:
  description:
    - hourly_usd times 730 hours.
  type: float
  returned: always
lines:
  description:
    - One readable line per machine group.
  type: list
  elements: str
  returned: always
sources:
  description:
    - Where the prices came from (the API, or the table and its date).
  type: list
  elements: str
  returned: always
missing:
  description:
    - Instance types or storage without a known price.
  type: list
  elements: str
  returned: always
api_error:
  description:
    - Why the Price List API was not used, null when it was.
  type: str
  returned: always
spot_note:
  description:
    - What the estimate means for spot machines, empty without spot.
  type: str
  returned: always
"""

from ansible_collections.dask_ec2_ansible.cluster.plugins.module_utils.dask_ec2_pricing import (
    HOURS_PER_MONTH, PRICE_LIST_REGION, SPOT_NOTE, PriceBook, estimate, pricing_config,
)
from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule


def main():
    module = AnsibleAWSModule(
        argument_spec=dict(
            machines=dict(type="list", elements="dict", required=True, options=dict(
                region=dict(type="str", required=True), instance_type=dict(type="str", required=True),
                count=dict(type="int", default=1), volume_gib=dict(type="int", default=0),
                spot=dict(type="bool", default=False), role=dict(type="str", default=""))),
            price_table=dict(type="dict", required=True),
            price_list_api=dict(type="bool", default=True),
        ),
        supports_check_mode=True,
    )
    client = None
    if module.params["price_list_api"]:
        client = module.client("pricing", region=PRICE_LIST_REGION, config=pricing_config())
    book = PriceBook(module.params["price_table"], client)
    result = estimate(book, module.params["machines"])
    hourly = result["hourly_usd"]
    module.exit_json(
        changed=False, hourly_usd=hourly, monthly_usd=None if hourly is None else round(hourly * HOURS_PER_MONTH, 2),
        lines=result["lines"], sources=result["sources"], missing=result["missing"],
        api_error=book.api_error, spot_note=SPOT_NOTE if result["spot"] else "",
    )


if __name__ == "__main__":
    main()
