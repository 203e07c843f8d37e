# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""How our boto3 clients retry: throttling with backoff, capacity refusals not at all.

EC2 answers InsufficientInstanceCapacity with an HTTP 500, which botocore
(any retry mode) and amazon.aws's AWSRetry treat as transient and retry for
minutes. Capacity in one zone does not come back in seconds: the caller
should try elsewhere (another zone, on-demand) at once. Throttling
(RequestLimitExceeded, HTTP 503) does pass in seconds and is retried.
"""

from __future__ import annotations

import random
import time

# botocore's standard mode: exponential backoff with jitter on throttling,
# 5xx and connection errors, here up to 10 attempts in all.
READ_RETRIES = {"retries": {"mode": "standard", "total_max_attempts": 10}}
# One attempt: the caller decides what to retry (see call_with_backoff).
NO_RETRIES = {"retries": {"mode": "standard", "total_max_attempts": 1}}

THROTTLING = frozenset({
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "EC2ThrottledException", "ServiceUnavailable", "Unavailable", "InternalError",
})
# Not enough machines of this kind here now: try another zone or market.
CAPACITY = frozenset({
    "InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity", "Unsupported", "SpotMaxPriceTooLow",
})
# An account limit: only a smaller request or a quota increase helps (for
# spot, on-demand has its own quota and is tried next).
QUOTA = frozenset({"VcpuLimitExceeded", "InstanceLimitExceeded", "MaxSpotInstanceCountExceeded"})


def error_code(error):
    return ((getattr(error, "response", None) or {}).get("Error") or {}).get("Code", "")


def call_with_backoff(call, attempts=8, delay=1.0, max_delay=20.0, sleep=time.sleep, on_retry=None):
    """call() with retries on throttling only, exponential backoff with full jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - only throttling is retried, the rest re-raised
            if error_code(error) not in THROTTLING or attempt == attempts:
                raise
            if on_retry:
                on_retry(error_code(error))
            sleep(random.uniform(0, min(max_delay, delay * 2 ** (attempt - 1))) + delay / 2)
    raise AssertionError("unreachable")


# What a launched machine's tags say of its market; the fallback tag marks a machine asked on spot that
# runs on-demand (status tells these apart from machines never meant to be spot).
LIFECYCLE_TAG = "dask-ec2-ansible:lifecycle"
FALLBACK_TAG = "dask-ec2-ansible:spot-fallback"
# RunInstances' InstanceMarketOptions for a spot machine: one-time, terminated when reclaimed.
SPOT_MARKET = {"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time",
                                                     "InstanceInterruptionBehavior": "terminate"}}


def market_tags(spot, lifecycle):
    """The market tags of a machine launched on `lifecycle`, asked on spot or not."""
    return {LIFECYCLE_TAG: lifecycle, **({FALLBACK_TAG: "true"} if spot and lifecycle == "on-demand" else {})}


def launch_choices(subnet_ids, spot):
    """The (market, subnet) tries for one machine, in order: spot in every subnet when asked, then
    on-demand in every subnet. A zone without capacity gives way to the next; spot refused, to on-demand."""
    return ([("spot", s) for s in subnet_ids] if spot else []) + [("on-demand", s) for s in subnet_ids]
