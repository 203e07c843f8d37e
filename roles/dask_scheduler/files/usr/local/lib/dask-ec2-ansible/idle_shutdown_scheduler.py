"""Scheduler preload: power a forgotten cluster off after it has been idle.

Loaded with `dask scheduler --preload <this file>` when the environment
variable DASK_EC2_ANSIBLE_IDLE_SHUTDOWN holds a duration such as "30m".
Idle is Dask's own notion (Scheduler.check_idle: no task transitions, no
graph updates, nothing queued or processing, no Jupyter activity), and a
worker joining counts as activity (a cluster being built or scaled is not
forgotten), and so does a playbook configuring the machine: site.yml holds
the shutdown with a file in /run while it runs (HOLD; a hold older than
HOLD_MAX is a run that died, and is ignored). Without that, a scheduler
that site.yml started again after an idle shutdown could power itself off
in the middle of the run that reconfigures it. When the cluster has been idle that long, the scheduler

1. asks every worker to power its machine off (the worker preload writes a
   marker that a root systemd path unit acts on),
2. writes its own marker (same mechanism on the scheduler's machine),
3. closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from dask.utils import format_time, parse_timedelta
from distributed.diagnostics.plugin import SchedulerPlugin

logger = logging.getLogger("distributed.scheduler.idle_shutdown")

WORKER_OP = "dask_ec2_ansible_idle_shutdown"
HOLD = Path("/run/dask-ec2-ansible-configuring")
HOLD_MAX = 30 * 60


def held() -> bool:
    try:
        return time.time() - HOLD.stat().st_mtime < HOLD_MAX
    except OSError:
        return False


class _WorkerJoins(SchedulerPlugin):
    name = "dask-ec2-ansible-idle-shutdown"

    def __init__(self):
        self.last_join = time.time()

    def add_worker(self, scheduler, worker):
        self.last_join = time.time()


def dask_setup(scheduler):
    timeout = parse_timedelta(os.environ["DASK_EC2_ANSIBLE_IDLE_SHUTDOWN"])
    marker = Path(os.environ.get("DASK_EC2_ANSIBLE_IDLE_MARKER", "idle-shutdown")).resolve()
    marker.unlink(missing_ok=True)
    interval = max(1.0, min(30.0, timeout / 4))
    joins = _WorkerJoins()
    scheduler.add_plugin(joins)

    async def watch():
        while scheduler.status.name not in ("closing", "closed"):
            await asyncio.sleep(interval)
            if held():
                joins.last_join = time.time()
                continue
            since = scheduler.check_idle()
            if since is None:
                continue
            since = max(since, joins.last_join)
            if time.time() - since < timeout:
                continue
            logger.warning("Cluster idle for %s: powering the machines off", format_time(timeout))
            try:
                await scheduler.broadcast(msg={"op": WORKER_OP}, on_error="ignore")
            except Exception:  # a worker that is gone must not keep the rest running
                logger.exception("Could not reach every worker")
            marker.write_text(f"idle since {since}\n")
            await scheduler.close(reason="idle-shutdown")
            return

    scheduler._dask_ec2_ansible_idle_task = asyncio.get_running_loop().create_task(watch())
    logger.info("Idle shutdown after %s (marker %s)", format_time(timeout), marker)
