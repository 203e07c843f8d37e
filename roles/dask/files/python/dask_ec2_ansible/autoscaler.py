"""The autoscaler: a service on the scheduler's machine that starts and stops the cluster's extra workers.

    python -m dask_ec2_ansible.autoscaler /etc/dask-ec2-ansible/autoscaler.json

Dask decides (``distributed.deploy.adaptive_core.AdaptiveCore``, with the scheduler's ``adaptive_target``,
``workers_to_close`` and ``retire_workers``); this only starts and stops machines. The size asked for comes
from ``Cluster.scale``/``Cluster.adapt`` through the scheduler's metadata (kept in the state directory as
well, so a restart of either loses nothing); the machines come from EC2, found by their tags, never from
memory: an instance launched before a restart is found by the launch tag it was given at creation.

Each new worker gets its TLS identity by enrollment: its user data carries a one-time token, which it
sends back with its instance id and a certificate request; the token must be the one given to that
instance, unused, and the request must come from the instance's own address. The certificate is signed with
an issuing key that only this service reads (the cluster CA's key never leaves the controller).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import pathlib
import secrets
import ssl
import subprocess
import tempfile
import time
from typing import Any, Iterable

import boto3
import botocore.config
import botocore.exceptions
from dask.utils import parse_timedelta
from distributed.core import rpc
from distributed.deploy.adaptive_core import AdaptiveCore
from distributed.security import Security
from tornado import httpserver, web

# The same code as the dask_ec2_launch module's (plugins/module_utils/dask_ec2_retry.py), not a copy.
from ._ec2_retry import (CAPACITY, NO_RETRIES, QUOTA, READ_RETRIES, SPOT_MARKET, call_with_backoff, error_code,
                         launch_choices, market_tags)

logger = logging.getLogger("dask_ec2_ansible.autoscaler")

# Where Cluster.scale/adapt leave the request, in the scheduler's metadata.
REQUEST_KEY = ["dask-ec2-ansible", "request"]
STATUS_KEY = ["dask-ec2-ansible", "autoscaler"]
AUTOSCALED_TAG = "dask-ec2-ansible:autoscaled"
LAUNCH_TAG = "dask-ec2-ansible:launch"
LIVE = ["pending", "running"]


def _tags(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class State:
    """What must survive a restart: the last request, and the launches with their tokens (only digests)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        self.request: dict | None = data.get("request")
        # The settings' request (site.yml's) this service last applied: a changed one is applied again.
        self.initial: dict | None = data.get("initial")
        self.launches: dict[str, dict] = data.get("launches", {})

    def save(self) -> None:
        fd, name = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        with os.fdopen(fd, "w") as out:
            json.dump({"request": self.request, "initial": self.initial, "launches": self.launches}, out, indent=2)
        os.replace(name, self.path)


class Autoscaler(AdaptiveCore):
    def __init__(self, config: dict):
        self.config = config
        self.fixed = list(config["fixed_workers"])
        self.limits = {"minimum": len(self.fixed), "maximum": int(config["maximum"])}
        # cluster.adapt()'s minimum when it names none (scale_minimum).
        self.limits["scale_minimum"] = min(max(int(config.get("minimum", 0)), self.limits["minimum"]),
                                           self.limits["maximum"])
        self.interval = parse_timedelta(config["interval"], default="seconds")
        super().__init__(minimum=self.limits["minimum"], maximum=self.limits["maximum"], wait_count=1)
        self.state = State(pathlib.Path(config["state_dir"]) / "state.json")
        self.ec2 = boto3.client("ec2", region_name=config["region"], config=botocore.config.Config(**READ_RETRIES))
        # Capacity refusals (HTTP 500) are not retried: the next subnet is tried at once.
        self.ec2_write = boto3.client("ec2", region_name=config["region"], config=botocore.config.Config(**NO_RETRIES))
        tls = config.get("tls")
        self.security = Security(tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert_file"],
                                 tls_client_key=tls["key_file"], require_encryption=True) if tls else Security()
        self.scheduler = rpc(config["scheduler_address"], connection_args=self.security.get_connection_args("client"))
        self.instances: dict[str, dict] = {}     # Dask name (instance id) -> instance
        self.workers: set[str] = set()           # Dask names the scheduler has
        self.mode = "fixed"
        self.requested_n = len(self.fixed)
        self.adaptive_options: dict[str, Any] = {}
        self.last_error = ""
        self.quota_until = 0.0
        self.spot_quota_until = 0.0

    # ---- AdaptiveCore's view: names of workers, planned, requested and observed ----
    @property
    def plan(self) -> set:
        return set(self.fixed) | set(self.instances)

    @property
    def requested(self) -> set:
        return self.plan

    @property
    def observed(self) -> set:
        return self.workers

    async def target(self) -> int:
        if self.mode == "adaptive":
            return await self.scheduler.adaptive_target(
                target_duration=self.adaptive_options.get("target_duration", self.config["target_duration"]))
        return self.requested_n

    async def workers_to_close(self, target: int) -> list:
        # Dask's choice, kept to the workers this service started (site.yml's own are never stopped here).
        chosen = await self.scheduler.workers_to_close(target=target, attribute="name")
        mine = [name for name in chosen if name in self.instances]
        spare = [name for name in self.instances if name in self.workers and name not in mine]
        return (mine + spare)[: max(0, len(self.plan) - target)]

    async def scale_up(self, n: int) -> None:
        wanted = min(n, self.limits["maximum"]) - len(self.plan)
        if wanted <= 0:
            return
        if time.monotonic() < self.quota_until:
            return
        for _attempt in range(wanted):
            if not self.launch():
                break

    async def scale_down(self, workers: Iterable) -> None:
        workers = [w for w in workers if w in self.instances]
        never_joined = [w for w in workers if w not in self.workers]
        joined = [w for w in workers if w in self.workers]
        retired: list[str] = []
        if joined:
            # Their results move to the workers that stay; only those the scheduler retired are stopped.
            answer = await self.scheduler.retire_workers(names=joined, close_workers=True, remove=True)
            retired = [info.get("name") for info in (answer or {}).values()]
            logger.info("retired %s (asked: %s)", retired, joined)
        self.terminate([w for w in never_joined + retired if w in self.instances], "scaled down")

    # ---- EC2 ----
    def refresh(self) -> None:
        filters = [{"Name": f"tag:{k}", "Values": [v]} for k, v in self.config["cluster_tags"].items()]
        filters += [{"Name": f"tag:{AUTOSCALED_TAG}", "Values": ["true"]},
                    {"Name": "instance-state-name", "Values": LIVE}]
        found = {}
        for page in self.ec2.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                for instance in reservation["Instances"]:
                    found[instance["InstanceId"]] = instance
        self.instances = found
        for instance in found.values():
            launch = _tags(instance).get(LAUNCH_TAG, "")
            entry = self.state.launches.get(launch)
            if entry is not None and entry.get("instance_id") != instance["InstanceId"]:
                entry["instance_id"] = instance["InstanceId"]   # launched before a restart: found by its tag
                self.state.save()

    def launch(self) -> bool:
        """One worker: on spot first when the cluster's workers are (aws_spot), in the first subnet with
        capacity, then on-demand; False when none could be had (said once)."""
        launch, token = secrets.token_hex(16), secrets.token_urlsafe(32)
        self.state.launches[launch] = {"token": _digest(token), "created": time.time(), "used": False}
        self.state.save()   # before the request: a restart finds the instance by its launch tag
        user_data = self.config["user_data"].replace("@ENROLL_TOKEN@", token)
        spot, last = self.config.get("spot", False), None
        for attempt, (lifecycle, subnet) in enumerate(launch_choices(self.config["subnet_ids"], spot)):
            if lifecycle == "spot" and time.monotonic() < self.spot_quota_until:
                continue
            tags = dict(self.config["cluster_tags"], **self.config["instance_tags"], **market_tags(spot, lifecycle),
                        **{AUTOSCALED_TAG: "true", LAUNCH_TAG: launch, "dask-ec2-ansible:role": "worker",
                           "Name": f"{self.config['name_prefix']}-auto"})
            # A token of its own per try: EC2 refuses a token used before with other parameters.
            params = dict(self.config["run_instances"], MinCount=1, MaxCount=1, SubnetId=subnet,
                          UserData=user_data, ClientToken=f"{launch}-{attempt}", TagSpecifications=[
                              {"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]},
                              {"ResourceType": "volume", "Tags": [{"Key": k, "Value": v} for k, v in
                                                                  self.config["cluster_tags"].items()]}])
            if lifecycle == "spot":
                params["InstanceMarketOptions"] = SPOT_MARKET
            try:
                reservation = call_with_backoff(lambda: self.ec2_write.run_instances(**params))
            except botocore.exceptions.ClientError as error:
                code = error_code(error)
                last = f"{code}: {error.response.get('Error', {}).get('Message', '')}"
                if code in CAPACITY:
                    logger.warning("no %s capacity in %s: %s; trying the next", lifecycle, subnet, last)
                    continue
                if code in QUOTA and lifecycle == "spot":
                    # The spot quota is the region's: no other subnet would take it; on-demand has its own.
                    self.spot_quota_until = time.monotonic() + self.config["quota_backoff"]
                    logger.warning("EC2 refused a spot worker on quota (%s): on-demand, and no spot for %s s",
                                   last, self.config["quota_backoff"])
                    continue
                if code in QUOTA:
                    self.quota_until = time.monotonic() + self.config["quota_backoff"]
                    logger.error("EC2 refused a worker on quota (%s): not trying again for %s s. Ask AWS for a "
                                 "higher quota or a smaller scale_maximum.", last, self.config["quota_backoff"])
                else:
                    logger.error("EC2 refused a worker: %s", last)
                break
            instance = reservation["Instances"][0]
            name = instance["InstanceId"]
            self.state.launches[launch]["instance_id"] = name
            self.state.save()
            self.instances[name] = instance
            call_with_backoff(lambda: self.ec2.create_tags(Resources=[name], Tags=[
                {"Key": "Name", "Value": f"{self.config['name_prefix']}-{name}"}]))
            logger.info("launched %s in %s (%s)", name, subnet, lifecycle)
            return True
        self.state.launches.pop(launch, None)
        self.state.save()
        self.last_error = last or "no subnet to launch into"
        return False

    def terminate(self, names: list[str], why: str) -> None:
        if not names:
            return
        call_with_backoff(lambda: self.ec2.terminate_instances(InstanceIds=names))
        for name in names:
            self.instances.pop(name, None)
        for launch, entry in list(self.state.launches.items()):
            if entry.get("instance_id") in names:
                del self.state.launches[launch]
        self.state.save()
        logger.info("terminated %s (%s)", names, why)

    def terminate_the_late(self) -> None:
        bound = self.config["join_timeout"]
        now = time.time()
        late = [name for name, instance in self.instances.items() if name not in self.workers
                and now - instance["LaunchTime"].timestamp() > bound]
        self.terminate(late, f"never joined within {bound} s")

    # ---- the loop ----
    def initial_request(self) -> dict:
        """What the settings ask for (site.yml's): a size, or adaptive within limits."""
        initial = self.config["initial"]
        return dict(initial) if isinstance(initial, dict) else {"mode": "fixed", "n": int(initial)}

    async def read_request(self) -> None:
        initial = self.initial_request()
        request = await self.scheduler.get_metadata(keys=REQUEST_KEY, default=None)
        if self.state.initial is not None and initial != self.state.initial:
            # site.yml changed the settings: they win over what a notebook asked before.
            logger.info("the settings changed: %s", initial)
            request = initial
            await self.scheduler.set_metadata(keys=REQUEST_KEY, value=request)
        elif request is None:
            # A first start, or a scheduler started again: what was asked before, else the settings.
            request = self.state.request or initial
            await self.scheduler.set_metadata(keys=REQUEST_KEY, value=request)
        if initial != self.state.initial:
            self.state.initial = initial
            self.state.save()
        if request != self.state.request:
            self.state.request = request
            self.state.save()
            logger.info("asked: %s", request)
        self.mode = request.get("mode", "fixed")
        if self.mode == "adaptive":
            self.minimum = max(self.limits["minimum"], int(request.get("minimum", self.limits["scale_minimum"])))
            self.maximum = min(self.limits["maximum"], int(request.get("maximum", self.limits["maximum"])))
            self.wait_count = int(request.get("wait_count", self.config["wait_count"]))
            self.adaptive_options = request
        else:
            self.minimum, self.maximum, self.wait_count = self.limits["minimum"], self.limits["maximum"], 1
            self.requested_n = int(request.get("n", self.limits["minimum"]))

    async def tick(self) -> None:
        await self.read_request()
        info = await self.scheduler.identity(n_workers=-1)
        self.workers = {w.get("name") for w in info.get("workers", {}).values()}
        await asyncio.get_running_loop().run_in_executor(None, self.refresh)
        self.terminate_the_late()
        await self.adapt()
        await self.scheduler.set_metadata(keys=STATUS_KEY, value={
            "mode": self.mode, "workers": len(self.workers), "instances": sorted(self.instances),
            "fixed": self.fixed, "minimum": self.minimum, "maximum": self.maximum, "limits": self.limits,
            "error": self.last_error,
            "time": time.time()})

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except (OSError, asyncio.TimeoutError) as error:
                logger.warning("the scheduler does not answer (%s); trying again", error)
            except botocore.exceptions.BotoCoreError as error:
                logger.warning("EC2 does not answer (%s); trying again", error)
            except botocore.exceptions.ClientError as error:
                logger.error("EC2 refused: %s", error)
            await asyncio.sleep(self.interval)

    # ---- enrollment ----
    def enroll(self, instance_id: str, token: str, csr: str, address: str) -> str:
        """The certificate for a worker this service launched; ValueError (said to nobody) otherwise."""
        entry = next((e for e in self.state.launches.values() if e.get("instance_id") == instance_id), None)
        if entry is None:
            self.refresh()
            entry = next((e for e in self.state.launches.values() if e.get("instance_id") == instance_id), None)
        instance = self.instances.get(instance_id)
        if entry is None or instance is None:
            raise ValueError(f"{instance_id} is no instance this autoscaler launched")
        if entry.get("used"):
            raise ValueError(f"{instance_id} has enrolled already (a replayed token)")
        if not secrets.compare_digest(entry["token"], _digest(token)):
            raise ValueError(f"wrong token for {instance_id}")
        if instance.get("PrivateIpAddress") != address:
            raise ValueError(f"{instance_id} is at {instance.get('PrivateIpAddress')}, the request came from {address}")
        subject = subprocess.run(["openssl", "req", "-noout", "-subject", "-nameopt", "RFC2253"], input=csr,
                                 capture_output=True, text=True, check=True).stdout.strip()
        if subject != f"subject=CN={instance_id}":
            raise ValueError(f"the request of {instance_id} names {subject}")
        entry["used"] = True
        self.state.save()
        with tempfile.TemporaryDirectory() as work:
            pathlib.Path(work, "req.pem").write_text(csr)
            pathlib.Path(work, "ext.cnf").write_text(
                "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature,keyAgreement\n"
                f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:{instance_id},IP:{address}\n")
            issuing = self.config["issuing"]
            return subprocess.run(
                ["openssl", "x509", "-req", "-in", f"{work}/req.pem", "-CA", issuing["cert_file"],
                 "-CAkey", issuing["key_file"], "-set_serial", "0x" + secrets.token_hex(16),
                 "-days", str(self.config["certificate_days"]), "-sha256", "-extfile", f"{work}/ext.cnf"],
                capture_output=True, text=True, check=True).stdout


class EnrollHandler(web.RequestHandler):
    def initialize(self, autoscaler: Autoscaler):
        self.autoscaler = autoscaler

    def post(self):
        try:
            body = json.loads(self.request.body)
            certificate = self.autoscaler.enroll(str(body["instance_id"]), str(body["token"]), str(body["csr"]),
                                                 self.request.remote_ip)
        except (ValueError, KeyError, TypeError, subprocess.CalledProcessError) as error:
            logger.warning("refused an enrollment from %s: %s", self.request.remote_ip, error)
            self.set_status(403)
            self.finish({"error": "refused"})
            return
        logger.info("enrolled %s", body["instance_id"])
        self.finish({"certificate": certificate})


async def main(config: dict) -> None:
    autoscaler = Autoscaler(config)
    tls = config["tls"]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls["cert_file"], tls["key_file"])
    server = httpserver.HTTPServer(web.Application([("/enroll", EnrollHandler, {"autoscaler": autoscaler})]),
                                   ssl_options=context)
    server.listen(config["enroll_port"])
    logger.info("enrollment on port %s; keeping %s fixed worker(s), at most %s in all",
                config["enroll_port"], len(config["fixed_workers"]), config["maximum"])
    await autoscaler.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=pathlib.Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    asyncio.run(main(json.loads(args.config.read_text())))
