"""Checks of a running cluster that every end-to-end test shares: a Dask client
from cluster.json, Jupyter's REST API and a kernel on the cluster, and what a
site.yml run's output says a task did."""

from __future__ import annotations

import json
import re
import time
import uuid
import warnings
from pathlib import Path

import requests
import websocket


def security_for(info):
    from distributed import Security

    tls = info["tls"]
    return Security(tls_ca_file=tls["ca_file"], tls_client_cert=tls["cert_file"], tls_client_key=tls["key_file"],
                    require_encryption=True)


def client_for(info, **kwargs):
    from distributed import Client

    with warnings.catch_warnings():
        # The controller's Python patch level may differ from the nodes'.
        warnings.simplefilter("ignore")
        return Client(info["scheduler_address"], security=security_for(info), timeout=30, **kwargs)


def jupyter_get(info, url, **kwargs):
    return requests.get(url, verify=info["jupyter_ca_file"], timeout=10, **kwargs)


def wait_for_workers(client, count: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if len(client.scheduler_info(n_workers=-1)["workers"]) == count:
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{count} workers not connected within {timeout} s")


def run_in_kernel(info, code: str, timeout: float = 120, kernel_name: str = "python3") -> str:
    """Start a kernel through Jupyter's REST API, run code, return its stdout."""
    token = Path(info["jupyter_token_file"]).read_text().strip()
    base = info["jupyter_url"].removesuffix("/lab")
    auth = {"Authorization": f"token {token}"}
    ca = info["jupyter_ca_file"]
    kernel = requests.post(f"{base}/api/kernels", headers=auth, json={"name": kernel_name}, verify=ca, timeout=30)
    assert kernel.status_code == 201, kernel.text
    kernel_id = kernel.json()["id"]
    ws = websocket.create_connection(
        base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {token}"], timeout=timeout, sslopt={"ca_certs": ca},
    )
    try:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": uuid.uuid4().hex,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        stdout, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "stream" and msg["content"]["name"] == "stdout":
                stdout.append(msg["content"]["text"])
            elif kind == "error":
                raise AssertionError("kernel error: " + "\n".join(msg["content"]["traceback"]))
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                # Idle on iopub comes after all of the request's output; the
                # shell channel's execute_reply may overtake the output.
                return "".join(stdout)
        raise AssertionError("no reply from the kernel in time")
    finally:
        ws.close()
        requests.delete(f"{base}/api/kernels/{kernel_id}", headers=auth, verify=ca, timeout=30)


# What installs anything on a machine (tasks of a site.yml run): none of these
# may report "changed" on a machine of a baked image.
INSTALL_TASKS = [
    "common : Install the base packages that are missing (Debian family)",
    "uv : Find uv's wheels in the package index (once, for every machine that needs uv)",
    "uv : Download uv's wheel for this machine (checked against the index's sha256)",
    "uv : Unpack uv from the wheel",
    "dask : Create the Dask virtual environment",
    "dask : Install the Dask environment",
    "jupyterlab : Install Jupyter Lab and the Dask extension into the Dask environment",
]


def task_results(output: str, task: str) -> list[str]:
    """The result lines ("ok: [host]", "changed: [host]", "skipping: ...") of one task."""
    lines, inside = [], False
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            inside = line.split("[", 1)[1].rsplit("]", 1)[0] == task
        elif inside and re.match(r"^(ok|changed|skipping|failed|fatal): \[", line):
            lines.append(line)
    return lines
