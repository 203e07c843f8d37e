"""Checks of a running cluster that every end-to-end test shares: a Dask client
from cluster.json, Jupyter's REST API and a kernel on the cluster, and what a
site.yml run's output says a task did."""

from __future__ import annotations

import base64
import os
import json
import re
import subprocess
import time
import uuid
import warnings
from contextlib import contextmanager
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


def printed_connect_lines(output: str) -> list[str]:
    """The lines site.yml prints under "paste these lines:", up to the next empty line, exactly as printed."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith("paste these lines:")) + 1
    while not lines[start].strip():
        start += 1
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    return lines[start:end]


def run_pasted_lines(pasted: list[str], workers: int, cwd) -> None:
    """Run the pasted lines with this repository's .venv/bin/python (in cwd), then compute with their client."""
    python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
    script = "\n".join([*pasted,
                        "print('WORKERS', len(client.scheduler_info(n_workers=-1)['workers']))",
                        "print('RESULT', client.submit(sum, range(101)).result())", ""])
    run = subprocess.run([str(python), "-"], input=script, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["WORKERS", str(workers), "RESULT", "5050"], run.stdout


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
    with kernel_on_the_cluster(info, kernel_name=kernel_name) as execute:
        return execute(code, timeout=timeout)


@contextmanager
def kernel_on_the_cluster(info, kernel_name: str = "python3", notebook: str | None = None):
    """A kernel on the cluster through Jupyter's REST API; yields execute(code, timeout) -> its stdout.

    With notebook (a path in the notebook directory) the kernel is started the
    way Lab starts one for it (a session: the kernel works in its folder)."""
    token = Path(info["jupyter_token_file"]).read_text().strip()
    base = info["jupyter_url"].removesuffix("/lab")
    auth = {"Authorization": f"token {token}"}
    ca = info["jupyter_ca_file"]
    if notebook is None:
        started = requests.post(f"{base}/api/kernels", headers=auth, json={"name": kernel_name}, verify=ca, timeout=30)
        assert started.status_code == 201, started.text
        kernel_id, end = started.json()["id"], f"{base}/api/kernels/{started.json()['id']}"
    else:
        started = requests.post(f"{base}/api/sessions", headers=auth, verify=ca, timeout=60, json={
            "path": notebook, "name": Path(notebook).name, "type": "notebook", "kernel": {"name": kernel_name}})
        assert started.status_code == 201, started.text
        kernel_id, end = started.json()["kernel"]["id"], f"{base}/api/sessions/{started.json()['id']}"
    ws = websocket.create_connection(
        base.replace("http", "ws", 1) + f"/api/kernels/{kernel_id}/channels",
        header=[f"Authorization: token {token}"], timeout=60, sslopt={"ca_certs": ca},
    )
    session = uuid.uuid4().hex

    def execute(code: str, timeout: float = 120) -> str:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({
            "header": {"msg_id": msg_id, "username": "test", "session": session,
                       "msg_type": "execute_request", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))
        stdout, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            ws.settimeout(max(deadline - time.monotonic(), 0.1))
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

    try:
        yield execute
    finally:
        ws.close()
        requests.delete(end, headers=auth, verify=ca, timeout=30)


def _jupyter_api(info):
    token = Path(info["jupyter_token_file"]).read_text().strip()
    return info["jupyter_url"].removesuffix("/lab") + "/api/contents", {"Authorization": f"token {token}"}


def jupyter_file(info, path: str) -> bytes | None:
    """The bytes of a file in the notebook directory as Jupyter serves it (None: no such file)."""
    api, auth = _jupyter_api(info)
    got = requests.get(f"{api}/{path}", params={"type": "file", "format": "base64", "content": "1"}, headers=auth,
                       verify=info["jupyter_ca_file"], timeout=30)
    if got.status_code == 404:
        return None
    assert got.status_code == 200, got.text
    return base64.b64decode(got.json()["content"])


def save_notebook(info, path: str, *sources: str) -> bytes:
    """Save a notebook through Jupyter's REST API, as Lab does when the user saves one; return the
    bytes Jupyter wrote."""
    api, auth = _jupyter_api(info)
    notebook = {"nbformat": 4, "nbformat_minor": 5,
                "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                "cells": [{"id": uuid.uuid4().hex[:8], "cell_type": "code", "source": source, "metadata": {},
                           "outputs": [], "execution_count": None} for source in sources]}
    put = requests.put(f"{api}/{path}", json={"type": "notebook", "format": "json", "content": notebook}, headers=auth,
                       verify=info["jupyter_ca_file"], timeout=30)
    assert put.status_code in (200, 201), put.text
    return jupyter_file(info, path)


def save_file(info, path: str, data: bytes) -> None:
    """Upload a file (folders on its path made first), as Lab's upload does."""
    api, auth = _jupyter_api(info)
    parts = path.split("/")
    for depth in range(1, len(parts)):
        folder = "/".join(parts[:depth])
        requests.put(f"{api}/{folder}", json={"type": "directory"}, headers=auth, verify=info["jupyter_ca_file"],
                     timeout=30)
    put = requests.put(f"{api}/{path}", json={"type": "file", "format": "base64",
                                               "content": base64.b64encode(data).decode()},
                       headers=auth, verify=info["jupyter_ca_file"], timeout=30)
    assert put.status_code in (200, 201), put.text


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


# The work the image's stamps (written by bake.yml) let every machine of a cluster from a baked image skip.
STAMPED_INSTALLS = [
    "common : Install the packages, the CA bundle and the service user",
    "uv : Install uv at the pinned version",
    "dask : Install the pinned requirements into the Dask environment",
]


def assert_the_image_stamps_skipped_the_installs(output: str, machines) -> None:
    """Every machine found the stamps bake.yml left on its image matching: the installing roles did nothing."""
    for task in STAMPED_INSTALLS:
        results = task_results(output, task)
        skipped = sorted(re.match(r"skipping: \[([^\]]+)\]", line).group(1) for line in results
                         if line.startswith("skipping: "))
        assert skipped == sorted(machines), f"{task}: {results}"


def task_results(output: str, task: str) -> list[str]:
    """The result lines ("ok: [host]", "changed: [host]", "skipping: ...") of one task."""
    lines, inside = [], False
    for line in output.splitlines():
        if line.startswith(("TASK [", "RUNNING HANDLER [")):
            inside = line.split("[", 1)[1].rsplit("]", 1)[0] == task
        elif inside and re.match(r"^(ok|changed|skipping|failed|fatal): \[", line):
            lines.append(line)
    return lines


def assert_back_with_the_notebook(info, path: str, notebook: bytes, workers: int) -> None:
    """A cluster brought back by site.yml after idle_shutdown: the notebook saved before is there, byte for
    byte, and the new workers compute."""
    assert jupyter_file(info, path) == notebook
    client = client_for(info)
    try:
        wait_for_workers(client, workers, timeout=60)
        assert client.submit(sum, [1, 2, 3]).result(timeout=60) == 6
    finally:
        client.close()


def assert_jupyter_wants_the_token_and_its_kernel_joins(info, workers: int) -> None:
    """Jupyter refuses requests without the cluster's token and answers with it; a kernel's Client() with no
    arguments joins this cluster and computes on its workers."""
    token = Path(info["jupyter_token_file"]).read_text().strip()
    api = info["jupyter_url"].removesuffix("/lab") + "/api"
    assert jupyter_get(info, f"{api}/kernels").status_code == 403
    assert jupyter_get(info, info["jupyter_url"], allow_redirects=False).status_code in (302, 403)
    assert jupyter_get(info, f"{api}/kernels", headers={"Authorization": f"token {token}"}).status_code == 200
    out = run_in_kernel(info, "\n".join([
        "import distributed",
        "client = distributed.Client(timeout=30)",
        "print('WORKERS', len(client.scheduler_info(n_workers=-1)['workers']))",
        "print('RESULT', client.submit(sum, range(101)).result())",
    ]))
    assert dict(line.split(" ", 1) for line in out.strip().splitlines()) == {"WORKERS": str(workers), "RESULT": "5050"}


# ---- The services' journals: make logs, and what teardown keeps ----

def log_on_worker(info, machine: str, text: str) -> None:
    """Have the worker process on that machine log text (as a task's logging call would), so that it
    lands in the journal of its unit, dask-worker.service."""
    import logging

    client = client_for(info)
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        (address,) = [a for a, w in workers.items() if w["name"] == machine]
        client.run(logging.getLogger("distributed.worker").warning, text, workers=[address])
    finally:
        client.close()


def make_logs(cluster: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parent.parent
    return subprocess.run(["make", "logs", f"CLUSTER={cluster}", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, env=env)


def logged_line(cluster: str, text: str, *args: str, env: dict | None = None, timeout: float = 30) -> str:
    """The line of make logs that holds text (journald may take a moment to have it)."""
    deadline = time.monotonic() + timeout
    while True:
        run = make_logs(cluster, *args, env=env)
        assert run.returncode == 0, run.stderr
        lines = [line for line in run.stdout.splitlines() if text in line]
        if lines or time.monotonic() > deadline:
            assert lines, f"{text!r} not in make logs {' '.join(args)}:\n{run.stdout[-3000:]}"
            return lines[0]
        time.sleep(1)


CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@contextmanager
def chromium_page(info, home: Path, ca_name: str):
    """Headless Chromium (the distribution's, driven by Playwright) that trusts the cluster's CA the way a user
    imports it: into the NSS database Chromium reads from $HOME/.pki/nssdb. No certificate error is ignored."""
    import shutil

    if not (Path(CHROMIUM).is_file() and shutil.which("certutil")):
        raise AssertionError(f"no Chromium at {CHROMIUM} or no certutil: run scripts/ensure-test-tools (make test does)")
    from playwright.sync_api import sync_playwright

    nssdb = f"sql:{home}/.pki/nssdb"
    (home / ".pki" / "nssdb").mkdir(parents=True)
    subprocess.run(["certutil", "-d", nssdb, "-N", "--empty-password"], check=True)
    subprocess.run(["certutil", "-d", nssdb, "-A", "-t", "C,,", "-n", ca_name, "-i", info["jupyter_ca_file"]],
                   check=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            # Chromium's sandbox refuses to run as root.
            args=["--no-sandbox"] if os.geteuid() == 0 else [],
            env={**os.environ, "HOME": str(home)},
        )
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()


# How long the Lab may take to draw its shell: its ~60 scripts come over TLS from a machine that shares this
# one's 2 cores with the other test process's cluster (make test runs two); once, under that load, 60 s was not enough.
LAB_SHELL_TIMEOUT_MS = 180_000


def log_in_to_lab(page, info) -> None:
    """The login page, the way a user gets there (the URL from the summary), and the token. When the Lab does not
    draw, the failure says what the page showed, what the browser logged and which requests failed or never ended,
    and leaves a screenshot in tests/artifacts/."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    console, failed, pending = [], [], {}
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("request", lambda r: pending.__setitem__(id(r), (time.monotonic(), r.url)))
    page.on("requestfinished", lambda r: pending.pop(id(r), None))
    # A failed request has ended too: it is said once, among the failed.
    page.on("requestfailed", lambda r: (pending.pop(id(r), None), failed.append(f"{r.method} {r.url}: {r.failure}")))
    page.goto(info["jupyter_url"])
    assert "/login" in page.url
    page.fill("#password_input", Path(info["jupyter_token_file"]).read_text().strip())
    page.click("#login_submit")
    try:
        page.wait_for_selector(".jp-LabShell", timeout=LAB_SHELL_TIMEOUT_MS)
    except PlaywrightTimeoutError:
        from conftest import ARTIFACTS

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / "lab-did-not-draw.png")
        now = time.monotonic()
        unfinished = sorted((f"{now - start:.0f}s {url}" for start, url in pending.values()), reverse=True)
        raise AssertionError(
            f"No Lab shell {LAB_SHELL_TIMEOUT_MS // 1000} s after logging in, at {page.url}\n"
            f"page text: {page.inner_text('body')[:1500]!r}\nbrowser console: {console[-20:]}\n"
            f"failed requests: {failed[-20:]}\nunfinished requests: {unfinished[:20]}") from None
    assert page.url.startswith(info["jupyter_url"])
