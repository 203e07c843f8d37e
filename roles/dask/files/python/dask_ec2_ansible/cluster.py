"""A Dask cluster object for a cluster made by dask-ec2-ansible.

    from dask_ec2_ansible import Cluster
    cluster = Cluster()                  # in a Jupyter kernel of the cluster
    cluster = Cluster.from_file(".clusters/lab/cluster.json")   # on the controller
    client = Client(cluster)

It attaches to a scheduler that runs already (closing it never stops the
cluster) and gives what notebooks written for LocalCluster or Coiled expect of
``client.cluster``: a repr and widget, ``dashboard_link``, ``scale(n)`` and
``adapt(...)``.

The size a cluster may have is what site.yml made it with (its scaling
limits, in the kernel's Dask configuration and in cluster.json). A request
outside them is clamped to them with a warning that names the setting to
change. On the docker provider the machines cannot start others (the scheduler
is never handed the Docker socket), so ``scale`` and ``adapt`` raise
ScalingError with the command that resizes the cluster instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import re
import warnings
from typing import Any

import dask
from distributed.core import Status, rpc
from distributed.deploy.cluster import Cluster as _DaskCluster
from distributed.objects import SchedulerInfo
from distributed.security import Security

# The section of the Dask configuration that site.yml writes for the kernels.
CONFIG = "dask-ec2-ansible"
# Where a request for a size goes: the scheduler's metadata, which the autoscaler on its machine reads
# (autoscaler.py); closing this object or the notebook changes nothing.
REQUEST_KEY = ["dask-ec2-ansible", "request"]
STATUS_KEY = ["dask-ec2-ansible", "autoscaler"]


class ScalingError(RuntimeError):
    """This cluster cannot be resized from Python (the message says how to resize it)."""


class ScalingWarning(UserWarning):
    """A request was clamped to the cluster's limits (the message names the setting)."""


# The workers an autoscaler started are named after their instance ids; site.yml's are not.
_AUTOSCALED_NAME = re.compile(r"^i-[0-9a-f]+$")


def _limits(scaling: dict[str, Any], names: list[str]) -> dict[str, Any]:
    # The kernels are not told worker_count (a scale-up must not reconfigure Jupyter): site.yml's workers
    # are the ones the scheduler has that the autoscaler did not start.
    fixed = len([n for n in names if not _AUTOSCALED_NAME.match(str(n))])
    workers = int(scaling["workers"]) if "workers" in scaling else fixed
    return {
        "provider": scaling.get("provider", ""),
        "workers": workers,
        "minimum": int(scaling.get("minimum", workers) or 0),
        "maximum": int(scaling.get("maximum", workers) or 0),
        "adaptive": bool(scaling.get("adaptive", False)),
        # Whether something on the scheduler's machine starts and stops machines.
        "autoscaler": bool(scaling.get("autoscaler", False)),
    }


class AdaptiveRequest:
    """What cluster.adapt() asked for (the Lab's Dask panel shows its limits)."""

    def __init__(self, minimum: int, maximum: int):
        self.minimum, self.maximum = minimum, maximum

    def stop(self) -> None:
        """Nothing runs here: the decisions are not made in this process."""

    def __repr__(self) -> str:
        return f"AdaptiveRequest(minimum={self.minimum}, maximum={self.maximum})"


class Cluster(_DaskCluster):
    """A running dask-ec2-ansible cluster (attached to, never started or stopped by this object).

    With no arguments it reads the Dask configuration: ``scheduler-address``, the TLS settings of
    ``distributed.comm.tls`` and the ``dask-ec2-ansible`` section, which a Jupyter kernel of the
    cluster has. Elsewhere use :meth:`from_file`.
    """

    def __init__(
        self,
        scheduler_address: str | None = None,
        *,
        security: Security | None = None,
        scaling: dict[str, Any] | None = None,
        dashboard_link: str | None = None,
        name: str | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        quiet: bool = True,
        **kwargs: Any,
    ):
        config = dask.config.get(CONFIG, default={}) or {}
        address = scheduler_address or dask.config.get("scheduler-address", default=None)
        if not address:
            raise ValueError(
                "No dask-ec2-ansible cluster to attach to: Cluster() with no arguments works in a Jupyter kernel of "
                "a cluster (its Dask configuration names the scheduler). On the machine that made the cluster, use "
                "Cluster.from_file('.clusters/NAME/cluster.json').")
        if kwargs:
            # dask-labextension passes what its "new cluster" dialog holds (e.g. a name): nothing we can start.
            kwargs.pop("n_workers", None)
        super().__init__(asynchronous=asynchronous, loop=loop, quiet=quiet,
                         name=name or config.get("cluster") or None)
        self.security = security or Security()
        self._scaling = dict(scaling if scaling is not None else config.get("scaling", {}))
        self._dashboard_link = dashboard_link
        # What the autoscaler last said (its mode and limits), followed with the scheduler.
        self._autoscaler_said: dict | None = None
        self.scheduler_comm = rpc(address, connection_args=self.security.get_connection_args("client"))
        if not self.asynchronous:
            self._loop_runner.start()
            self.sync(self._start)

    @classmethod
    def from_file(cls, path: str | pathlib.Path, **kwargs: Any) -> Cluster:
        """Attach from the controller: cluster.json (in .clusters/NAME/) names the scheduler and the TLS files."""
        info = json.loads(pathlib.Path(path).read_text())
        tls = info.get("tls") or {}
        security = kwargs.pop("security", None) or (Security(
            tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert_file"], tls_client_key=tls["key_file"],
            require_encryption=True) if tls else Security())
        scaling = dict(info.get("scaling") or {}, provider=info.get("provider", ""))
        scaling.setdefault("workers", info.get("workers", 0))
        return cls(info["scheduler_address"], security=security, scaling=scaling,
                   dashboard_link=(info["dashboard_url"].rstrip("/") + "/status") if info.get("dashboard_url") else None,
                   name=info.get("name"), **kwargs)

    async def _start(self) -> None:
        # Not distributed's worker-status subscription: the scheduler keeps one per name, so a second
        # cluster object (the Lab's Dask panel beside a kernel's) would silence the first. A poll instead.
        await self._read_scheduler()
        self._sync_cluster_info_task = asyncio.ensure_future(self._follow_scheduler())
        self.status = Status.running

    async def _follow_scheduler(self) -> None:
        while self.status == Status.running:
            await asyncio.sleep(self._sync_interval)
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await self._read_scheduler()

    async def _read_scheduler(self) -> None:
        self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity(n_workers=-1))
        if self._scaling.get("autoscaler"):
            self._autoscaler_said = await self.scheduler_comm.get_metadata(keys=STATUS_KEY, default=None)

    def _repr_html_(self, cluster_status: str | None = None) -> str:
        return super()._repr_html_(cluster_status=cluster_status or self._scaling_status())

    def __await__(self):
        async def start():
            if self.status == Status.created:
                await self._start()
            return self

        return start().__await__()

    @property
    def limits(self) -> dict[str, Any]:
        """provider, workers (site.yml's), minimum, maximum, adaptive, autoscaler."""
        names = [w.get("name") for w in self.scheduler_info["workers"].values()]
        return _limits(self._scaling, names)

    @property
    def _cluster_class_name(self) -> str:
        return "dask_ec2_ansible.Cluster"

    @property
    def dashboard_link(self) -> str:
        # The dashboard answers on the scheduler's machine only: through Jupyter's proxy, logged in.
        if self._dashboard_link:
            return self._dashboard_link
        link = dask.config.get("distributed.dashboard.link", default="")
        if link.startswith("/"):
            return link
        return super().dashboard_link

    def _fixed_size_hint(self) -> str:
        name = f" -e cluster_name={self.name}" if self.name else ""
        return f"ansible-playbook site.yml -e provider={self.limits['provider'] or 'PROVIDER'}{name} -e worker_count=N"

    def _check_provider(self, what: str) -> None:
        if self.limits["provider"] == "docker":
            raise ScalingError(
                f"{what} needs the aws provider: this cluster runs on local containers (provider docker), whose "
                "machines cannot start others (the scheduler is never handed the Docker socket). Change its size from "
                f"the controller: {self._fixed_size_hint()}. `make demo-aws` makes a cluster on the EC2 emulator.")

    def _clamp(self, n: int) -> int:
        """n within the cluster's limits, with a warning that names what to change when it was not."""
        low, high, workers = self.limits["minimum"], self.limits["maximum"], self.limits["workers"]
        if low <= n <= high:
            return n
        if not self.limits["autoscaler"]:
            warnings.warn(
                f"Asked for {n} workers; this cluster has a fixed size of {workers} (worker_count), which only site.yml "
                f"changes: it stays at {workers}. To resize it: {self._fixed_size_hint()}.", ScalingWarning, stacklevel=3)
            return workers
        if n > high:
            advice = f"this cluster's scale_maximum is {high}: scaling to {high}. To allow more, run site.yml again " \
                     "with -e scale_maximum=N."
        else:
            advice = f"this cluster always has its {low} workers of worker_count: scaling to {low}. To allow fewer, " \
                     "run site.yml again with -e worker_count=N (at least 1)."
        warnings.warn(f"Asked for {n} workers; {advice}", ScalingWarning, stacklevel=3)
        bound = high if n > high else low
        return bound

    def scale(self, n: int | None = None, memory: str | None = None, cores: int | None = None) -> None:
        """Ask for n workers (clamped to the cluster's limits, with a warning when it is)."""
        self._check_provider("Scaling from Python")
        if n is None or memory is not None or cores is not None:
            raise ScalingError("Give the number of workers: cluster.scale(n) (memory= and cores= are not supported).")
        n = self._clamp(int(n))
        if self.limits["autoscaler"]:
            return self.sync(self._ask, {"mode": "fixed", "n": n})
        return None

    async def _ask(self, request: dict) -> None:
        await self.scheduler_comm.set_metadata(keys=REQUEST_KEY, value=request)

    def autoscaler_status(self) -> dict | None:
        """What the autoscaler last said (mode, workers, its instances, the last EC2 refusal); None without one."""
        return self.sync(self.scheduler_comm.get_metadata, keys=STATUS_KEY, default=None)

    def adapt(self, *args: Any, minimum: int | None = None, maximum: int | None = None,
              **kwargs: Any) -> AdaptiveRequest | None:
        """Ask the cluster to size itself within [minimum, maximum] (clamped to its limits)."""
        self._check_provider("Adaptive scaling")
        if args:
            raise ScalingError("Give the limits by name: cluster.adapt(minimum=..., maximum=...).")
        if not self.limits["autoscaler"]:
            warnings.warn(
                f"This cluster has a fixed size of {self.limits['workers']} workers (worker_count), which only "
                f"site.yml changes: adapt() keeps it at that size. To resize it: {self._fixed_size_hint()}.",
                ScalingWarning, stacklevel=2)
            return None
        low = self._clamp(self._scale_minimum() if minimum is None else int(minimum))
        high = self._clamp(self.limits["maximum"] if maximum is None else int(maximum))
        options = {k: kwargs[k] for k in ("target_duration", "wait_count") if k in kwargs}
        sent = self.sync(self._ask, {"mode": "adaptive", "minimum": low, "maximum": high, **options})
        if self.asynchronous:
            # Callers expect an Adaptive back, not something to await (dask-labextension's Adapt dialog).
            self._adapt_request_task = asyncio.ensure_future(sent)
        return AdaptiveRequest(low, high)

    def _scale_minimum(self) -> int:
        # scale_minimum: from the autoscaler (a kernel is not told it), or from cluster.json.
        said = (self._autoscaler_said or {}).get("limits") or {}
        return int(said.get("scale_minimum", self._scaling.get("scale_minimum", self.limits["minimum"])))

    def _scaling_status(self) -> str:
        workers = len(self.scheduler_info["workers"])
        limits = self.limits
        mode_now = (self._autoscaler_said or {}).get("mode")
        adaptive = mode_now == "adaptive" if mode_now else limits["adaptive"]
        mode = "Fixed size" if limits["minimum"] == limits["maximum"] else (
            "Adaptive" if adaptive else "Manual")
        return (
            "<table>"
            f'<tr><td style="text-align: left;">Scaling mode: {mode} ({limits["provider"] or "?"} provider)</td></tr>'
            f'<tr><td style="text-align: left;">Workers: {workers}</td></tr>'
            f'<tr><td style="text-align: left;">Limits: {limits["minimum"]} to {limits["maximum"]}</td></tr>'
            "</table>")
