"""Worker preload: accept the scheduler's request to power the machine off.

Loaded with `dask worker --preload <this file>`. Registers the handler that
the scheduler's idle-shutdown preload broadcasts to; the handler writes a
marker file that a root systemd path unit turns into a power-off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger("distributed.worker.idle_shutdown")

WORKER_OP = "dask_ec2_ansible_idle_shutdown"


def dask_setup(worker):
    marker = Path(os.environ.get("DASK_EC2_ANSIBLE_IDLE_MARKER", "idle-shutdown")).resolve()
    marker.unlink(missing_ok=True)

    def idle_shutdown() -> str:
        logger.warning("The scheduler reports the cluster idle: powering this machine off")
        marker.write_text("requested by the scheduler\n")
        return "ok"

    worker.handlers[WORKER_OP] = idle_shutdown
