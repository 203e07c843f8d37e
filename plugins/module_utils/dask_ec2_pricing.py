# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""What EC2 machines cost per hour: the AWS Price List API where it answers,
else the dated price table shipped with the toolkit. Shared by the
dask_ec2_cost and dask_ec2_status modules."""

from __future__ import annotations

import json

HOURS_PER_MONTH = 730  # AWS's own convention for monthly figures
PRICE_LIST_REGION = "us-east-1"  # the Price List API's endpoint for the commercial partition
API_SOURCE = "AWS Price List API"
SPOT_NOTE = (
    "spot workers: the spot price is not known in advance and changes; "
    "the on-demand price shown is the most they can cost"
)


def pricing_config():
    """Short timeouts and no retries: an unreachable Price List API must not slow a run down."""
    return {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1, "mode": "standard"}}


def _on_demand_usd(price_list_items):
    """The hourly USD price in a GetProducts answer (PriceList: JSON strings), or None."""
    for item in price_list_items:
        product = json.loads(item) if isinstance(item, str) else item
        for term in product.get("terms", {}).get("OnDemand", {}).values():
            for dimension in term.get("priceDimensions", {}).values():
                usd = dimension.get("pricePerUnit", {}).get("USD")
                if dimension.get("unit") in ("Hrs", "Hours") and usd and float(usd) > 0:
                    return float(usd)
    return None


class PriceBook:
    """Prices per (region, instance type), asked once each.

    client: a boto3 "pricing" client, or None to use the table only. The first
    failing API call turns the API off for the rest of the run (and is
    reported as api_error), so a network without it costs one timeout."""

    def __init__(self, table, client=None):
        self.table = table or {}
        self.client = client
        self.api_error = None if client is not None else "not asked"
        self._cache = {}

    @property
    def table_source(self):
        return f"price table of {self.table.get('as_of', 'unknown date')} ({self.table.get('source', 'shipped with the toolkit')})"

    def _ask_api(self, region, instance_type):
        if self.client is None:
            return None
        filters = {
            "instanceType": instance_type, "regionCode": region, "operatingSystem": "Linux",
            "tenancy": "Shared", "preInstalledSw": "NA", "capacitystatus": "Used",
        }
        try:
            answer = self.client.get_products(
                ServiceCode="AmazonEC2", MaxResults=10,
                Filters=[{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()])
        except Exception as error:  # noqa: BLE001 - any failure means: use the table
            first_line = (str(error).splitlines() or [""])[0]
            self.api_error = f"{type(error).__name__}: {first_line.split(': <')[0][:200]}"
            self.client = None
            return None
        return _on_demand_usd(answer.get("PriceList", []))

    def instance(self, region, instance_type):
        """(USD per hour or None, source) for one on-demand Linux instance."""
        key = (region, instance_type)
        if key not in self._cache:
            price = self._ask_api(region, instance_type)
            if price is not None:
                self._cache[key] = (price, API_SOURCE)
            else:
                price = self.table.get("instances", {}).get(region, {}).get(instance_type)
                self._cache[key] = (float(price), self.table_source) if price is not None else (None, None)
        return self._cache[key]

    def storage_gib_hour(self, region):
        """(USD per GiB-hour of gp3, source): from the table (the API's storage entries are per volume type)."""
        price = self.table.get("gp3_gib_month", {}).get(region)
        if price is None:
            return None, None
        return float(price) / HOURS_PER_MONTH, self.table_source


def estimate(book, machines):
    """Cost per hour of machines: [{region, instance_type, count, volume_gib, spot, role}].

    Returns hourly_usd (None when a price is unknown), lines (one per
    machine group, readable), sources, missing, spot."""
    total, lines, sources, missing, spot = 0.0, [], [], [], False
    for machine in machines:
        count = int(machine.get("count", 1))
        region, itype = machine["region"], machine["instance_type"]
        price, source = book.instance(region, itype)
        gib = float(machine.get("volume_gib") or 0)
        storage, storage_source = book.storage_gib_hour(region) if gib else (0.0, None)
        label = f"{count} x {itype}" + (f" ({machine['role']})" if machine.get("role") else "") + f" in {region}"
        if machine.get("spot"):
            spot = True
            label += ", spot"
        if price is None:
            missing.append(f"{itype} in {region}")
            lines.append(f"{label}: no price known")
            total = None
            continue
        if gib and storage_source is None:
            missing.append(f"gp3 storage in {region}")
            lines.append(f"{label}: no gp3 storage price known")
            total = None
            continue
        storage = storage or 0.0
        line_total = count * (price + gib * storage)
        if total is not None:
            total += line_total
        lines.append(
            f"{label}: {count} x ${price:.4f}/h" + (f" + {count} x {gib:g} GiB gp3 ${gib * storage:.4f}/h" if gib else "")
            + f" = ${line_total:.4f}/h")
        for s in (source, storage_source):
            if s and s not in sources:
                sources.append(s)
    return {"hourly_usd": None if total is None else round(total, 4), "lines": lines, "sources": sources,
            "missing": missing, "spot": spot}
