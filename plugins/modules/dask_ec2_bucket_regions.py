#!/usr/bin/python
# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Where S3 buckets live, before a cluster is launched to read them."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dask_ec2_bucket_regions
short_description: Find the region of each S3 bucket a cluster will read or write
version_added: 0.2.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Asks S3 where each bucket is, with C(GetBucketLocation) and, when that is refused (a public
    bucket of another account), C(HeadBucket) (S3 names the region in its answer, also when it
    refuses the request).
  - Says which buckets are outside O(region), with a warning for each (reading them costs
    inter-region transfer, and time), and which do not exist.
  - Read-only; never changes anything, also not in check mode.
options:
  buckets:
    description: Bucket names.
    type: list
    elements: str
    required: true
  region:
    description: The cluster's region.
    type: str
    required: true
  transfer_usd_per_gb:
    description:
      - What S3 charges per GB read from another region, for the warning about each bucket outside
        O(region); 0 leaves the price out.
    type: float
    default: 0
extends_documentation_fragment:
  - amazon.aws.common.modules
  - amazon.aws.boto3
"""

EXAMPLES = r"""
- name: Where the cluster's data is
  dask_ec2_ansible.cluster.dask_ec2_bucket_regions:
    buckets: [sentinel-cogs, my-lab-results]
    region: us-east-1
  register: regions
"""

RETURN = r"""
buckets:
  description: Each bucket, its region (null when S3 did not say) and why not.
  type: list
  elements: dict
  returned: always
  contains:
    bucket:
      description: The bucket's name.
      type: str
    region:
      description: Its region, null when unknown.
      type: str
    error:
      description: Why the region is unknown (empty when it is known).
      type: str
elsewhere:
  description: The buckets whose region is known and is not O(region).
  type: list
  elements: str
  returned: always
missing:
  description: The buckets S3 says do not exist.
  type: list
  elements: str
  returned: always
"""

try:
    import botocore
except ImportError:
    pass  # AnsibleAWSModule says that boto3 is missing

from ansible_collections.amazon.aws.plugins.module_utils.modules import AnsibleAWSModule
from ansible_collections.dask_ec2_ansible.cluster.plugins.module_utils.dask_ec2_retry import error_code


def _region_header(response):
    return (response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("x-amz-bucket-region")


def bucket_region(client, bucket):
    """(region or None, error or '')."""
    try:
        # us-east-1's buckets answer an empty location (S3's oldest convention), eu-west-1's old ones "EU".
        location = client.get_bucket_location(Bucket=bucket).get("LocationConstraint") or "us-east-1"
        return ("eu-west-1" if location == "EU" else location), ""
    except botocore.exceptions.ClientError as error:
        if error_code(error) == "NoSuchBucket":
            return None, "no such bucket"
        refusal = f"{error_code(error)}: {error.response.get('Error', {}).get('Message', '')}"
    except botocore.exceptions.BotoCoreError as error:
        return None, str(error)
    # Another account's bucket (a public archive) refuses GetBucketLocation; HeadBucket's
    # answer names the region, also when it refuses.
    try:
        region = _region_header(client.head_bucket(Bucket=bucket))
    except botocore.exceptions.ClientError as error:
        region = _region_header(error.response)
        if not region and error_code(error) in ("404", "NoSuchBucket"):
            return None, "no such bucket"
    except botocore.exceptions.BotoCoreError as error:
        return None, str(error)
    return (region, "") if region else (None, refusal)


def main():
    module = AnsibleAWSModule(
        argument_spec=dict(buckets=dict(type="list", elements="str", required=True),
                           region=dict(type="str", required=True),
                           transfer_usd_per_gb=dict(type="float", default=0)),
        supports_check_mode=True,
    )
    # S3 redirects a bucket's requests to its region; asking in the cluster's region is enough.
    client = module.client("s3", region=module.params["region"])
    found = []
    for bucket in dict.fromkeys(module.params["buckets"]):
        region, error = bucket_region(client, bucket)
        found.append({"bucket": bucket, "region": region, "error": error})
    here, price = module.params["region"], module.params["transfer_usd_per_gb"]
    for b in found:
        if b["region"] and b["region"] != here:
            module.warn(f"S3 bucket {b['bucket']} is in {b['region']}, the cluster in {here}: every GB the cluster reads "
                        "from it crosses regions" + (f" (about ${price:.2f} per GB" if price else "")
                        + (", billed to the bucket's owner or, requester pays, to you)" if price else "")
                        + f" and is slower. Launch the cluster in {b['region']} (aws_region={b['region']}) to avoid it.")
    module.exit_json(
        changed=False, buckets=found,
        elsewhere=[b["bucket"] for b in found if b["region"] and b["region"] != module.params["region"]],
        missing=[b["bucket"] for b in found if b["error"] == "no such bucket"],
    )


if __name__ == "__main__":
    main()
