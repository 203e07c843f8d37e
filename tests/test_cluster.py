"""End to end on the local provider: site.yml, a real Dask client, a real
Jupyter server and kernel, idempotence, check mode, teardown."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from cluster_checks import (chromium_page, client_for, jupyter_get, kernel_on_the_cluster, log_in_to_lab,
                            log_on_worker, logged_line, make_logs, printed_connect_lines, run_in_kernel,
                            run_pasted_lines, save_file, save_notebook, security_for, task_results, wait_for_workers)
from conftest import ARTIFACTS, ROOT, docker_available, docker_exec, docker_objects, extra_ca_args, run_playbook

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not docker_available(), reason="needs a Docker engine (make docker)"),
]



def controller_address() -> str:
    """An address of this machine that the cluster's containers reach (through Docker's NAT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.255.255.255", 9))  # UDP: nothing is sent, the route picks the source address
            return probe.getsockname()[0]
        except OSError:
            return "172.17.0.1"  # docker0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


# Another name (DASK_TEST_CLUSTER=...) lets two checkouts run these tests on one Docker engine.
CLUSTER = os.environ.get("DASK_TEST_CLUSTER", "citest")
WORKERS = 2
# The user's project (jupyter_project_repo), served by `git daemon` on this machine.
PROJECT = "citest-analysis"
PROJECT_URL = f"git://{controller_address()}:{free_port()}/{PROJECT}.git"
# A setting for the whole cluster, with what systemd would read as a specifier (%), a quote and a backslash.
ENVIRONMENT = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "LAB_NOTE": 'half of 100% is "50%" \\ not more'}
# As every worker, the scheduler, the kernels and run.yml see it (requester_pays is on).
SEEN_ENVIRONMENT = dict(ENVIRONMENT, AWS_REQUEST_PAYER="requester", FSSPEC_S3_REQUESTER_PAYS="true")
# The geospatial notebook's packages, the way docs/working.md says to
# install them (a vars file of the repository: the path is from ROOT).
SITE_ARGS = ["-e", "provider=docker", "-e", f"cluster_name={CLUSTER}", "-e", f"worker_count={WORKERS}",
             "-e", f"jupyter_project_repo={PROJECT_URL}", "-e", "@notebooks/geospatial.yml",
             "-e", json.dumps({"cluster_environment": ENVIRONMENT, "requester_pays": True}), *extra_ca_args()]
STATE = ROOT / ".clusters" / CLUSTER
ARTIFACTS_SCORES = ARTIFACTS / "systemd-exposure.txt"
SCHEDULER = f"dask-{CLUSTER}-scheduler"
WORKER_1 = f"dask-{CLUSTER}-worker-1"


def teardown(cluster: str = CLUSTER, name: str = "teardown", **settings: str):
    extra = [arg for key, value in settings.items() for arg in ("-e", f"{key}={value}")]
    return run_playbook("teardown.yml", "-e", "provider=docker", "-e", f"cluster_name={cluster}", *extra, name=name)


@pytest.fixture(scope="module")
def project_repo(tmp_path_factory):
    """A small uv project in a git repository that the cluster clones over the network."""
    root = tmp_path_factory.mktemp("git")
    work = root / "work"
    work.mkdir()
    (work / "pyproject.toml").write_text(
        f'[project]\nname = "{PROJECT}"\nversion = "0.1.0"\nrequires-python = ">=3.11"\ndependencies = ["six"]\n')
    (work / "analysis.py").write_text("import six\n")
    git = ["git", "-c", "user.name=citest", "-c", "user.email=citest@example.invalid", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "A project"]):
        subprocess.run([*git, *args], cwd=work, check=True, capture_output=True)
    subprocess.run([*git, "clone", "-q", "--bare", str(work), str(root / f"{PROJECT}.git")], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=work, check=True, capture_output=True,
                            text=True).stdout.strip()
    port = PROJECT_URL.rsplit(":", 1)[1].split("/", 1)[0]
    daemon = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", f"--base-path={root}",
                               "--listen=0.0.0.0", f"--port={port}", str(root)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):
            if subprocess.run(["git", "ls-remote", PROJECT_URL], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            raise AssertionError(f"git daemon does not serve {PROJECT_URL}")
        yield {"url": PROJECT_URL, "commit": commit}
    finally:
        daemon.terminate()
        daemon.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(project_repo):
    """A fresh cluster, built once for this module and always torn down."""
    teardown(name="teardown-before")
    try:
        first = run_playbook("site.yml", *SITE_ARGS, name="site-first-run")
        info = json.loads((STATE / "cluster.json").read_text())
        yield {"info": info, "first_run": first}
    finally:
        teardown(name="teardown-after")


def test_first_run_configured_every_machine(cluster):
    recap = cluster["first_run"].recap
    assert set(recap) == {"localhost", SCHEDULER, WORKER_1, f"dask-{CLUSTER}-worker-2"}
    assert all(host["failed"] == 0 and host["unreachable"] == 0 for host in recap.values())
    assert all(recap[host]["changed"] > 0 for host in recap if host != "localhost")


def test_cluster_json_describes_the_cluster(cluster):
    info = cluster["info"]
    for key in ("name", "provider", "scheduler_address", "dashboard_url", "jupyter_url",
                "jupyter_token_file", "workers", "dask_version"):
        assert key in info, key
    assert info["name"] == CLUSTER
    assert info["provider"] == "docker"
    assert info["workers"] == WORKERS
    assert info["dask_version"] == "2026.8.0"
    assert info["scheduler_address"].startswith("tls://") and info["scheduler_address"].endswith(":8786")
    assert info["jupyter_url"].startswith("https://")
    for name in ("ca_file", "cert_file", "key_file"):
        assert Path(info["tls"][name]).is_file(), name
    assert stat.S_IMODE(Path(info["tls"]["key_file"]).stat().st_mode) == 0o600
    assert stat.S_IMODE((STATE / "tls" / "ca.key").stat().st_mode) == 0o600
    token_file = Path(info["jupyter_token_file"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert len(token_file.read_text().strip()) >= 32
    assert stat.S_IMODE((STATE / "ssh" / "id_ed25519").stat().st_mode) == 0o600
    assert stat.S_IMODE(STATE.stat().st_mode) == 0o700


def test_client_on_the_controller_computes_on_all_workers(cluster):
    import dask
    import dask.datasets

    client = client_for(cluster["info"])
    try:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) == WORKERS
        assert {w["name"] for w in workers.values()} == {f"dask-{CLUSTER}-worker-{i}" for i in (1, 2)}
        assert client.get_versions(check=False)["scheduler"]["packages"]["dask"] == dask.__version__
        df = dask.datasets.timeseries(start="2000-01-01", end="2000-01-15")
        means = df.groupby("name").x.mean().compute()
        assert len(means) > 10
        assert means.abs().max() < 0.1  # x is uniform on [-1, 1]
        # Every worker took part.
        assert len(client.run(lambda: 1)) == WORKERS
    finally:
        client.close()


def test_functions_sent_from_this_machine_run_on_the_cluster(cluster):
    """The cluster runs this machine's Python, so functions pickled here by
    value (a lambda, a function defined here: what a notebook or script sends)
    run there."""
    import sys

    def offset(x):
        return x + 100

    info = cluster["info"]
    assert info["python_version"] == "%d.%d" % sys.version_info[:2] == info["controller_python_version"]
    assert info["python_mismatch"] is None
    client = client_for(info)
    try:
        assert client.submit(lambda x: x + 1, 1).result(timeout=60) == 2
        assert client.submit(offset, 1).result(timeout=60) == 101
    finally:
        client.close()


def test_the_dashboards_answer_through_jupyter_only(cluster):
    """The dashboards have no login. The scheduler's answers on its machine, where Jupyter's proxy reaches it for a
    logged-in browser; the workers' on theirs. From anywhere else on the cluster's network, this machine or another
    of the cluster's, both ports are refused."""
    info = cluster["info"]
    token = Path(info["jupyter_token_file"]).read_text().strip()
    counts = info["dashboard_url"] + "/json/counts.json"
    assert "/proxy/" in counts and counts.startswith(info["jupyter_url"].removesuffix("/lab"))
    anonymous = requests.get(counts, verify=info["jupyter_ca_file"], allow_redirects=False, timeout=10)
    assert anonymous.status_code in (302, 403), anonymous.status_code
    response = requests.get(counts, headers={"Authorization": f"token {token}"}, verify=info["jupyter_ca_file"],
                            timeout=10)
    assert response.status_code == 200
    assert response.json()["workers"] == WORKERS
    scheduler, worker = info["nodes"][SCHEDULER], info["nodes"][WORKER_1]
    dashboards = {(scheduler, 8787): SCHEDULER, (worker, 8790): WORKER_1}
    for (address, port), machine in dashboards.items():
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((address, port), timeout=10).close()
        other = WORKER_1 if machine == SCHEDULER else SCHEDULER
        # curl's 7: could not connect.
        assert docker_exec(other, "curl", "-sS", "-m", "10", "-o", "/dev/null", f"http://{address}:{port}/health"
                           ).returncode == 7, (machine, port)
        assert docker_exec(machine, "curl", "-fsS", "-m", "10", f"http://127.0.0.1:{port}/health").stdout == "ok"


def test_jupyter_requires_the_token(cluster):
    info = cluster["info"]
    token = Path(info["jupyter_token_file"]).read_text().strip()
    api = info["jupyter_url"].removesuffix("/lab") + "/api"
    assert jupyter_get(info, f"{api}/kernels").status_code == 403
    assert jupyter_get(info, f"{api}/kernels", headers={"Authorization": "token wrong"}).status_code == 403
    without = jupyter_get(info, info["jupyter_url"], allow_redirects=False)
    assert without.status_code in (302, 403)
    if without.status_code == 302:
        assert "/login" in without.headers["Location"]
    assert jupyter_get(info, info["jupyter_url"], params={"token": token}).status_code == 200
    assert jupyter_get(info, f"{api}/kernels", headers={"Authorization": f"token {token}"}).status_code == 200


def test_jupyter_does_not_serve_plain_http(cluster):
    plain = cluster["info"]["jupyter_url"].replace("https://", "http://", 1)
    try:
        response = requests.get(plain, timeout=10)
    except requests.exceptions.ConnectionError:
        return  # refused outright: fine
    assert response.status_code != 200
    assert "JupyterLab" not in response.text


def test_client_without_the_cluster_certificate_is_refused(cluster, tmp_path):
    from distributed import Client, Security

    info = cluster["info"]
    host, port = info["scheduler_address"].removeprefix("tls://").rsplit(":", 1)
    # Trusts the cluster's CA but shows no certificate of its own: the
    # scheduler ends the TLS session (certificate required).
    context = ssl.create_default_context(cafile=info["tls"]["ca_file"])
    context.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"hello")
                if not tls.recv(1):
                    raise ConnectionResetError("closed by the scheduler")
    # A certificate from another CA.
    other_ca = tmp_path / "other"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/CN=intruder", "-days", "1", "-keyout", f"{other_ca}.key", "-out", f"{other_ca}.pem"],
                   check=True, capture_output=True)
    intruder = Security(tls_ca_file=info["tls"]["ca_file"], tls_client_cert=f"{other_ca}.pem",
                        tls_client_key=f"{other_ca}.key", require_encryption=True)
    with pytest.raises((OSError, TimeoutError)):
        Client(info["scheduler_address"], security=intruder, timeout=5)


def test_plain_tcp_to_the_scheduler_is_refused(cluster):
    from distributed import Client

    plain = cluster["info"]["scheduler_address"].replace("tls://", "tcp://", 1)
    with pytest.raises((OSError, TimeoutError)):
        Client(plain, timeout=5)


def test_kernel_client_without_arguments_joins_this_cluster(cluster):
    info = cluster["info"]
    out = run_in_kernel(info, "\n".join([
        "import dask, distributed",
        "client = distributed.Client(timeout=30)",
        "print('CLUSTER', type(client.cluster).__name__)",
        "print('ADDRESS', client.scheduler.address)",
        "print('WORKERS', len(client.scheduler_info(n_workers=-1)['workers']))",
        "print('RESULT', client.submit(sum, range(101)).result())",
        "print('VERSION', dask.__version__)",
    ]))
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["CLUSTER"] == "NoneType", "Client() started a LocalCluster instead of joining"
    assert lines["ADDRESS"].startswith("tls://") and lines["ADDRESS"].endswith(":8786")
    assert lines["WORKERS"] == str(WORKERS)
    assert lines["RESULT"] == "5050"
    assert lines["VERSION"] == cluster["info"]["dask_version"]


def test_cluster_object_attaches_in_a_kernel_and_says_docker_cannot_scale_from_python(cluster):
    """Notebooks written for LocalCluster or Coiled make a cluster object and scale it: Cluster() attaches to this
    cluster (closing it leaves the cluster running), and on docker scale() and adapt() say how to resize instead."""
    info = cluster["info"]
    out = run_in_kernel(info, "\n".join([
        "import distributed",
        "from dask_ec2_ansible import Cluster, ScalingError",
        "cluster = Cluster()",
        "client = distributed.Client(cluster)",
        "print('NAME', cluster.name)",
        "print('SAME', client.cluster is cluster)",
        "print('WORKERS', len(cluster.scheduler_info['workers']))",
        "print('DASHBOARD', client.dashboard_link)",
        "print('RESULT', client.submit(sum, range(101)).result())",
        "for call in (lambda: client.cluster.scale(10), lambda: cluster.adapt(minimum=0, maximum=4)):",
        "    try:",
        "        call()",
        "    except ScalingError as error:",
        "        print('REFUSED', error)",
        "client.close()",
        "cluster.close()",
    ]))
    lines = [line.split(" ", 1) for line in out.strip().splitlines()]
    said = dict(line for line in lines if line[0] != "REFUSED")
    assert said["NAME"] == CLUSTER and said["SAME"] == "True" and said["RESULT"] == "5050", out
    assert said["WORKERS"] == str(WORKERS)
    assert said["DASHBOARD"] == "/proxy/8787/status"
    refused = [line[1] for line in lines if line[0] == "REFUSED"]
    assert len(refused) == 2, out
    assert "needs the aws provider" in refused[0] and f"-e cluster_name={CLUSTER} -e worker_count=N" in refused[0]
    # Closing the cluster object stopped nothing.
    client = client_for(info)
    try:
        assert len(client.scheduler_info(n_workers=-1)["workers"]) == WORKERS
    finally:
        client.close()


def test_cluster_object_from_cluster_json_on_the_controller_and_in_the_dask_panel(cluster):
    """cluster.json attaches this machine's Python to the cluster; Lab's Dask panel lists the same cluster (its
    cluster manager, whose Scale dialog calls Cluster.scale, refused on docker)."""
    from dask_ec2_ansible import Cluster, ScalingError

    info = cluster["info"]
    assert info["scaling"] == {"provider": "docker", "workers": WORKERS, "minimum": WORKERS, "maximum": WORKERS,
                               "adaptive": False, "autoscaler": False}
    with Cluster.from_file(ROOT / ".clusters" / CLUSTER / "cluster.json") as attached:
        assert attached.name == CLUSTER and attached.scheduler_address == info["scheduler_address"]
        assert len(attached.scheduler_info["workers"]) == WORKERS
        assert f"workers={WORKERS}" in repr(attached) and "Fixed size" in attached._repr_html_()
        assert attached.dashboard_link == info["dashboard_url"] + "/status"
        with pytest.raises(ScalingError, match="needs the aws provider"):
            attached.scale(WORKERS + 1)
    token = Path(info["jupyter_token_file"]).read_text().strip()
    base = info["jupyter_url"].removesuffix("/lab")
    auth = {"Authorization": f"token {token}"}
    listed = jupyter_get(info, f"{base}/dask/clusters", headers=auth)
    assert listed.status_code == 200, listed.text
    clusters = listed.json()
    assert [(c["name"], c["workers"], c["scheduler_address"]) for c in clusters] == [
        (CLUSTER, WORKERS, info["scheduler_address"])], clusters
    scaled = requests.patch(f"{base}/dask/clusters/{clusters[0]['id']}", headers=auth, json={"workers": WORKERS + 1},
                            verify=info["jupyter_ca_file"], timeout=30)
    assert scaled.status_code >= 400, scaled.text
    assert jupyter_get(info, f"{base}/dask/clusters", headers=auth).json()[0]["workers"] == WORKERS


def test_project_repository_is_cloned_and_is_a_kernel(cluster, project_repo):
    info = cluster["info"]
    token = Path(info["jupyter_token_file"]).read_text().strip()
    api = info["jupyter_url"].removesuffix("/lab") + "/api"
    specs = jupyter_get(info, f"{api}/kernelspecs", headers={"Authorization": f"token {token}"}).json()["kernelspecs"]
    assert f"project-{PROJECT}" in specs, sorted(specs)
    assert specs[f"project-{PROJECT}"]["spec"]["display_name"] == f"Python ({PROJECT})"
    clone = f"/var/lib/dask/notebooks/{PROJECT}"
    assert docker_exec(SCHEDULER, "stat", "-c", "%U", clone).stdout.strip() == "dask"
    head = docker_exec(SCHEDULER, "runuser", "-u", "dask", "--", "git", "-C", clone, "rev-parse", "HEAD")
    assert head.stdout.strip() == project_repo["commit"], head.stderr
    out = run_in_kernel(info, "import sys, six\nprint(sys.prefix)\nprint(six.__name__)", kernel_name=f"project-{PROJECT}")
    assert out.split() == [f"{clone}/.venv", "six"]


# ---- Jupyter Lab in a real browser: the distribution's Chromium driven by Playwright ----

NOTEBOOK = "getting-started.ipynb"
PANELS = {"Task Stream": "individual-task-stream", "Progress": "individual-progress",
          "Workers Memory": "individual-workers-memory"}
# What a bokeh page in a panel shows: the size of every canvas (bokeh draws
# into shadow DOM) and the columns of its data sources.
BOKEH_STATE_JS = """() => {
    const canvases = [];
    const walk = (root) => {
        for (const el of root.querySelectorAll('*')) {
            if (el.tagName === 'CANVAS') {
                const box = el.getBoundingClientRect();
                canvases.push([box.width, box.height]);
            }
            if (el.shadowRoot) walk(el.shadowRoot);
        }
    };
    walk(document);
    const sources = [];
    for (const doc of (window.Bokeh ? window.Bokeh.documents : [])) {
        for (const model of doc.all_models) {
            if (model.type !== 'ColumnDataSource') continue;
            const data = model.data instanceof Map ? Object.fromEntries(model.data) : model.data;
            sources.push(Object.fromEntries(Object.entries(data).map(([k, v]) => [k, Array.from(v)])));
        }
    }
    return {canvases, sources};
}"""


@pytest.fixture(scope="module")
def lab(cluster, tmp_path_factory):
    """A Jupyter Lab page in headless Chromium that trusts the cluster's CA (logged in by the first test)."""
    info = cluster["info"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with chromium_page(info, tmp_path_factory.mktemp("chromium-home"), f"dask-{CLUSTER} CA") as page:
        yield {"page": page, "info": info, "base": info["jupyter_url"].removesuffix("/lab")}


def run_all_cells(page, timeout_ms: int = 300_000):
    """Run → Run All Cells, as a user would; wait until every code cell ran (or one failed)."""
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    page.wait_for_function("""() => {
        if (document.querySelector('.jp-Notebook [data-mime-type="application/vnd.jupyter.error"]')) return true;
        const prompts = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')];
        return prompts.length > 0 && prompts.every(p => /^\\[\\d+\\]:$/.test(p.textContent.trim()));
    }""", timeout=timeout_ms)
    page.get_by_text("Python 3 (ipykernel) | Idle").wait_for()
    errors = page.locator('.jp-Notebook [data-mime-type="application/vnd.jupyter.error"]')
    assert errors.count() == 0, errors.first.inner_text()


def test_browser_logs_in_and_runs_the_getting_started_notebook(lab):
    import dask
    import dask.datasets

    page, info, base = lab["page"], lab["info"], lab["base"]
    log_in_to_lab(page, info)
    # The notebook the toolkit put there, in a fresh workspace (no restored layout).
    page.goto(f"{base}/lab/workspaces/citest-{uuid.uuid4().hex[:8]}/tree/{NOTEBOOK}")
    page.wait_for_selector(".jp-Notebook .jp-CodeCell")
    run_all_cells(page)
    page.screenshot(path=ARTIFACTS / "jupyterlab-notebook.png")

    outputs = "\n".join(page.locator(".jp-Notebook .jp-CodeCell .jp-OutputArea").all_inner_texts())
    assert f"Scheduler: {info['scheduler_address']}" in outputs, outputs
    assert re.search(rf"Workers\s*: {WORKERS} with \d+ threads", outputs), outputs
    # The Client's dashboard link: Lab's proxy, on the origin the browser is on (a tunnel too).
    assert "Dashboard: /proxy/8787/status" in outputs, outputs
    # The same computation here, without the cluster: the workers' result must agree.
    df = dask.datasets.timeseries(start="2000-01-01", end="2000-01-31", freq="1s", seed=42)
    rows, x_sum = dask.compute(df.shape[0], df.x.sum(), scheduler="sync")
    assert f"Rows : {rows}" in outputs, outputs
    shown = float(re.search(r"Sum x: (\S+)", outputs).group(1))
    assert math.isclose(shown, float(x_sum), rel_tol=1e-9), (shown, float(x_sum))
    for name in ("Alice", "Bob", "Charlie", "Dan", "Edith"):  # the groupby's first rows
        assert re.search(rf"^{name}\s+-?0\.\d+$", outputs, re.MULTILINE), outputs
    n = 4000 * 4000  # x holds 0 … n-1 and so does x.T: the sum is 2 · n(n-1)/2
    assert f"Array sum: {n * (n - 1)}" in outputs, outputs


def test_browser_shows_the_dask_panels_with_live_plots(lab):
    page, info, base = lab["page"], lab["info"], lab["base"]
    if ".jp-Notebook" not in page.content():  # run alone: log in and open the notebook
        test_browser_logs_in_and_runs_the_getting_started_notebook(lab)
    client = client_for(info)
    try:
        worker_addresses = set(client.scheduler_info(n_workers=-1)["workers"])
    finally:
        client.close()
    assert len(worker_addresses) == WORKERS

    if not page.locator("#dask-dashboard-launcher").is_visible():
        page.click(".jp-SideBar .lm-TabBar-tab[data-id='dask-dashboard-launcher']")
    # The plot buttons appear only once the extension has found a dashboard
    # at its URL: Jupyter's proxy, same origin as Lab (HTTPS, logged in).
    for title in PANELS:
        page.click(f".dask-DashboardListing-item button[value='{title}']")
    frames = {}
    for title, path in PANELS.items():
        page.click(f"#jp-main-dock-panel .lm-TabBar-tab:has-text('{title}')")
        iframe = page.locator(f"iframe[src$='/{path}']")
        iframe.wait_for()
        assert iframe.get_attribute("src") == f"{base}/proxy/8787/{path}"
        frame = iframe.element_handle().content_frame()
        frame.wait_for_function("() => window.Bokeh && window.Bokeh.documents.length > 0")
        frames[title] = frame
    def task_rectangles():
        """The Task Stream's rectangles: one per task that ran, with its worker."""
        sources = frames["Task Stream"].evaluate(BOKEH_STATE_JS)["sources"]
        rectangles = [s for s in sources if {"start", "worker", "name"} <= s.keys()]
        assert len(rectangles) == 1, [sorted(s) for s in sources]
        return rectangles[0]

    before = set(zip(task_rectangles()["start"], task_rectangles()["worker"]))
    page.click(f"#jp-main-dock-panel .lm-TabBar-tab:has-text('{NOTEBOOK}')")
    run_all_cells(page)
    # Live: the open panel received the tasks that just ran (the keys repeat,
    # the notebook's data are seeded, but each task has a start time of its own).
    deadline = time.monotonic() + 30
    while not set(zip(task_rectangles()["start"], task_rectangles()["worker"])) - before:
        assert time.monotonic() < deadline, "the Task Stream panel did not receive the new tasks"
        time.sleep(0.5)
    page.locator(".jp-CodeCell").filter(has_text="Array sum").first.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    page.screenshot(path=ARTIFACTS / "jupyterlab-dask-panels.png")

    for title, frame in frames.items():
        page.click(f"#jp-main-dock-panel .lm-TabBar-tab:has-text('{title}')")
        page.wait_for_timeout(1000)
        state = frame.evaluate(BOKEH_STATE_JS)
        assert any(w > 100 and h > 100 for w, h in state["canvases"]), (title, state["canvases"])
        if title == "Task Stream":
            rectangles = next(s for s in state["sources"] if "worker" in s and "name" in s)
            assert set(rectangles["worker"]) == worker_addresses
            assert "timeseries" in rectangles["name"], sorted(set(rectangles["name"]))
        if title == "Workers Memory":
            bars = next(s for s in state["sources"] if "worker" in s)
            assert set(bars["worker"]) == worker_addresses
        page.screenshot(path=ARTIFACTS / f"jupyterlab-panel-{PANELS[title]}.png")
    # Save (as a user would) and leave: no autosave may touch the notebook later.
    page.click(f"#jp-main-dock-panel .lm-TabBar-tab:has-text('{NOTEBOOK}')")
    page.keyboard.press("Control+s")
    page.wait_for_timeout(2000)
    page.goto("about:blank")


# Each service runs as its own account: Jupyter (and its kernels) as the one
# that owns the notebooks, the scheduler and the workers as theirs.
SERVICE_USERS = {"dask-scheduler": "dask-scheduler", "jupyterlab": "dask", "dask-worker": "dask-worker"}


@pytest.mark.parametrize(("container", "unit"), [
    (SCHEDULER, "dask-scheduler"), (SCHEDULER, "jupyterlab"), (WORKER_1, "dask-worker"),
])
def test_services_are_enabled_units_running_as_their_own_users(cluster, container, unit):
    assert docker_exec(container, "systemctl", "is-active", unit).stdout.strip() == "active"
    assert docker_exec(container, "systemctl", "is-enabled", unit).stdout.strip() == "enabled"
    pid = docker_exec(container, "systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip()
    assert pid not in ("", "0")
    assert docker_exec(container, "ps", "-o", "user=", "-p", pid).stdout.strip() == SERVICE_USERS[unit]
    # Its own byte-code cache, owned by its user (no shared, writable one).
    cache = docker_exec(container, "systemctl", "show", "-p", "CacheDirectory", "--value", unit).stdout.strip()
    assert cache == f"{unit}-pycache"
    assert docker_exec(container, "stat", "-c", "%U", f"/var/cache/{cache}").stdout.strip() == SERVICE_USERS[unit]
    assert docker_exec(container, "test", "-e", "/var/cache/dask-pycache").returncode != 0


def test_the_dask_services_cannot_read_jupyters_token_key_or_notebooks(cluster):
    """The scheduler shares Jupyter's machine: code running in it (a task, a preload, a package) fails to read the
    token, Jupyter's HTTPS key and the notebooks, inside its unit and as its user outside it. Jupyter's key is
    not the node's (which the services read to speak TLS). Workers run on machines without any of it, and fail
    to read there too."""
    secrets = ["/etc/jupyter/jupyter_server_config.json", "/etc/jupyter/tls/key.pem", NOTEBOOKS]

    def attempt(paths):
        import os

        found = {}
        for path in paths:
            try:
                if os.path.isdir(path):
                    os.listdir(path)
                else:
                    open(path, "rb").close()
                found[path] = "read"
            except OSError as error:
                found[path] = type(error).__name__
        return found

    client = client_for(cluster["info"])
    try:
        in_scheduler = client.run_on_scheduler(attempt, secrets)
        on_workers = client.run(attempt, secrets)
    finally:
        client.close()
    assert in_scheduler == dict.fromkeys(secrets, "PermissionError"), in_scheduler
    # On a worker's machine Jupyter's files do not exist, and its user's home (made there too) is closed.
    assert all(set(found.values()) <= {"FileNotFoundError", "PermissionError"} for found in on_workers.values()), \
        on_workers
    for path in secrets:
        assert docker_exec(SCHEDULER, "runuser", "-u", "dask-scheduler", "--", "test", "-r", path).returncode != 0, path
        # The check can fail: Jupyter's own user reads each of them.
        assert docker_exec(SCHEDULER, "runuser", "-u", "dask", "--", "test", "-r", path).returncode == 0, path
    assert docker_exec(SCHEDULER, "cmp", "-s", "/etc/jupyter/tls/key.pem", "/etc/dask/tls/node.key").returncode == 1


def test_code_in_a_service_cannot_trace_or_see_other_users_processes(cluster):
    """SystemCallFilter=@system-service (ptrace is not in it: EPERM) and ProtectProc=invisible, measured where
    user code runs: in the scheduler and in every worker (outside the units the same code may trace, and sees
    PID 1)."""

    def confinement():
        """What a task sees of its machine: PTRACE_TRACEME's errno (0: allowed), whether PID 1 (root's systemd) is
        visible, its user, and whether every process it can see is its user's."""
        import ctypes
        import os
        import pwd

        libc = ctypes.CDLL(None, use_errno=True)
        child = os.fork()
        if child == 0:
            os._exit(0 if libc.ptrace(0, 0, 0, 0) == 0 else ctypes.get_errno())
        _, status = os.waitpid(child, 0)
        owners = {os.stat(f"/proc/{p}").st_uid for p in os.listdir("/proc") if p.isdigit()}
        return {"ptrace": os.waitstatus_to_exitcode(status), "pid1": os.path.exists("/proc/1"),
                "user": pwd.getpwuid(os.getuid()).pw_name, "only_own": owners == {os.getuid()}}

    client = client_for(cluster["info"])  # a function defined here travels by value
    try:
        seen = {**client.run(confinement), "scheduler": client.run_on_scheduler(confinement)}
    finally:
        client.close()
    assert len(seen) == WORKERS + 1
    expected = {"ptrace": 1, "pid1": False, "only_own": True}
    assert seen.pop("scheduler") == {**expected, "user": "dask-scheduler"}, seen
    assert all(found == {**expected, "user": "dask-worker"} for found in seen.values()), seen


@pytest.mark.parametrize(("container", "unit"), [
    (SCHEDULER, "dask-scheduler"), (SCHEDULER, "jupyterlab"), (WORKER_1, "dask-worker"),
])
def test_units_have_a_low_systemd_exposure_score(cluster, container, unit):
    """systemd-analyze security: 0 is fully locked down, 10 fully exposed; under 4 reads "OK"."""
    out = docker_exec(container, "systemd-analyze", "security", "--no-pager", f"{unit}.service").stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    ARTIFACTS_SCORES.parent.mkdir(parents=True, exist_ok=True)
    with ARTIFACTS_SCORES.open("a") as scores:
        scores.write(f"{unit} {score}\n")
    assert score < 4.0, out[-3000:]


# ---- Working on the cluster: files in and out, scripts, a shell and a tunnel ----

SYNC_ARGS = ["-e", "provider=docker", "-e", f"cluster_name={CLUSTER}"]
NOTEBOOKS = "/var/lib/dask/notebooks"


def tree(root: Path) -> dict[str, str]:
    """Every file under root, by relative path, with the sha256 of its bytes (read in chunks)."""
    import hashlib

    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest = hashlib.sha256()
            with path.open("rb") as stream:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    digest.update(chunk)
            digests[str(path.relative_to(root))] = digest.hexdigest()
    return digests


@pytest.mark.parametrize("method", ["auto", "copy"])
def test_sync_up_then_down_returns_identical_bytes(cluster, tmp_path, method):
    """auto is rsync here (the controller has it; the machine gets it); copy is the path without rsync."""
    data = tmp_path / "data"
    (data / "nested" / "deeper").mkdir(parents=True)
    (data / "nested" / "deeper" / "notes with spaces.txt").write_text("a nested file\n")
    (data / "nested" / "table.csv").write_text("x,y\n1,2\n")
    with (data / "big.bin").open("wb") as big:
        for _ in range(52):
            big.write(os.urandom(1 << 20))  # 52 MiB that compress to nothing less
    into = f"synctest-{method}"
    save_dir = tmp_path / "saved"

    up = run_playbook("playbooks/sync.yml", *SYNC_ARGS, "-e", f"up={data}/", "-e", f"into={into}",
                      "-e", f"sync_method={method}", name=f"sync-up-{method}")
    assert f"to {NOTEBOOKS}/{into}/data on {SCHEDULER} ({'rsync' if method == 'auto' else 'copy'})" in up.output
    owners = docker_exec(SCHEDULER, "find", f"{NOTEBOOKS}/{into}", "-printf", "%u\\n").stdout.split()
    assert set(owners) == {"dask"}, "the Jupyter user must own what was uploaded"
    size = docker_exec(SCHEDULER, "stat", "-c", "%s", f"{NOTEBOOKS}/{into}/data/big.bin").stdout.strip()
    assert size == str(52 << 20)

    down = run_playbook("playbooks/sync.yml", *SYNC_ARGS, "-e", f"down={into}/data", "-e", f"save_dir={save_dir}",
                        "-e", f"sync_method={method}", name=f"sync-down-{method}")
    back = save_dir / CLUSTER / into / "data"
    assert f"to {back} (" in down.output
    assert tree(back) == tree(data)
    assert len(tree(back)) == 3


SYNC_REFUSALS = [
    ([], "Neither up nor down is given"),
    (["-e", "up=README.md", "-e", "down=x"], "Both up and down are given"),
    (["-e", "up=/nonexistent/data"], "there is no file or folder /nonexistent/data on this machine"),
    (["-e", "up=README.md", "-e", "into=../.."], "into=../.. is outside the notebook directory"),
    (["-e", "down=../../../etc/shadow"], "down=../../../etc/shadow is outside the notebook directory"),
    (["-e", "down=/etc/shadow"], "down=/etc/shadow is outside the notebook directory"),
    (["-e", "down=no-such-results"], f"there is no {NOTEBOOKS}/no-such-results on {SCHEDULER}"),
]


def test_sync_refuses_bad_input_before_changing_anything(cluster, tmp_path):
    before = docker_exec(SCHEDULER, "find", NOTEBOOKS, "-maxdepth", "1").stdout
    for args, message in SYNC_REFUSALS:
        run = run_playbook("playbooks/sync.yml", *SYNC_ARGS, *args, "-e", f"save_dir={tmp_path}", check=False)
        assert run.returncode != 0, args
        assert message in run.output, (args, run.output[-3000:])
        assert all(host["changed"] == 0 for host in run.recap.values()), (args, run.changed_tasks())
    assert docker_exec(SCHEDULER, "find", NOTEBOOKS, "-maxdepth", "1").stdout == before
    assert list(tmp_path.iterdir()) == []


RUN_SCRIPT = """\
import getpass, json, os, sys
NAMES = %r
from distributed import Client

client = Client(timeout=30)  # no address: the kernels' Dask configuration
n = int(sys.argv[1])
total = client.submit(sum, range(n + 1)).result()
workers = len(client.scheduler_info(n_workers=-1)["workers"])
print(f"RESULT {total} WORKERS {workers} USER {getpass.getuser()} CWD {os.getcwd()}")
with open("result.json", "w") as out:
    json.dump({"total": total, "workers": workers, "args": sys.argv[1:],
               "environment": {name: os.environ.get(name) for name in NAMES}}, out)
print("a line on stderr", file=sys.stderr)
""" % sorted(SEEN_ENVIRONMENT)


def runs_dir() -> Path:
    return ROOT / "saved" / CLUSTER / "runs"


def new_run(before: set[Path]) -> Path:
    made = set(runs_dir().iterdir()) - before
    assert len(made) == 1, made
    return made.pop()


def remove_run(saved: Path) -> None:
    """The test's run, and saved/<cluster>/runs, saved/<cluster>, saved when that leaves them empty."""
    shutil.rmtree(saved, ignore_errors=True)
    try:
        os.removedirs(saved.parent)
    except OSError:
        pass  # not empty: someone's saved work


def test_run_script_computes_on_the_cluster_and_brings_back_its_output(cluster, tmp_path):
    script = tmp_path / "compute.py"
    script.write_text(RUN_SCRIPT)
    runs_dir().mkdir(parents=True, exist_ok=True)
    before = set(runs_dir().iterdir())
    run = run_playbook("playbooks/run.yml", *SYNC_ARGS, "-e", f"script={script}",
                       "-e", '{"script_args": ["100", "two words"]}', name="run-compute")
    saved = new_run(before)
    try:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{6}Z", saved.name)
        line = re.search(r"RESULT .*?(?=\"|$)", run.output, re.MULTILINE).group(0)
        assert line == f"RESULT 5050 WORKERS {WORKERS} USER dask CWD {NOTEBOOKS}/runs/{saved.name}"
        assert "a line on stderr" in run.output
        # cluster_environment and requester_pays reach run.yml's script as they reach the kernels.
        assert json.loads((saved / "result.json").read_text()) == {"total": 5050, "workers": WORKERS,
                                                                  "args": ["100", "two words"],
                                                                  "environment": SEEN_ENVIRONMENT}
        assert (saved / "compute.py").read_text() == RUN_SCRIPT
        assert line in (saved / "run-output.log").read_text()
    finally:
        remove_run(saved)


def test_run_script_that_raises_fails_the_playbook_with_its_error(cluster, tmp_path):
    script = tmp_path / "broken.py"
    script.write_text('open("partial.txt", "w").write("written before the error\\n")\n'
                      'raise ValueError("deliberately broken input 42")\n')
    runs_dir().mkdir(parents=True, exist_ok=True)
    before = set(runs_dir().iterdir())
    run = run_playbook("playbooks/run.yml", *SYNC_ARGS, "-e", f"script={script}", check=False, name="run-broken")
    saved = new_run(before)
    try:
        assert run.returncode != 0
        assert "broken.py failed with exit status 1" in run.output
        assert "ValueError: deliberately broken input 42" in run.output
        assert "Traceback (most recent call last)" in run.output
        assert (saved / "partial.txt").read_text() == "written before the error\n"
        assert "ValueError: deliberately broken input 42" in (saved / "run-output.log").read_text()
    finally:
        remove_run(saved)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_tunnel_serves_the_cluster_on_localhost_with_verified_tls(cluster):
    from distributed import Client

    info = cluster["info"]
    ports = [free_port() for _ in range(3)]
    tunnel = subprocess.Popen(["make", "tunnel", f"CLUSTER={CLUSTER}", f"PORTS={','.join(map(str, ports))}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all(port_open(port) for port in ports):
            assert tunnel.poll() is None, tunnel.stdout.read()
            assert time.monotonic() < deadline, "the tunnel's ports did not open"
            time.sleep(0.5)
        jupyter, dashboard, scheduler = ports
        # Dask's TLS through the tunnel, with the cluster's certificates.
        client = Client(f"tls://localhost:{scheduler}", security=security_for(info), timeout=30)
        try:
            assert client.submit(lambda x: x * 2, 21).result(timeout=60) == 42
            assert len(client.scheduler_info(n_workers=-1)["workers"]) == WORKERS
        finally:
            client.close()
        # The scheduler's certificate names localhost: a client that checks names accepts it.
        context = ssl.create_default_context(cafile=info["tls"]["ca_file"])
        context.load_cert_chain(info["tls"]["cert_file"], info["tls"]["key_file"])
        with socket.create_connection(("127.0.0.1", scheduler), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.getpeercert()
        # So does Jupyter's (requests checks the name); it still wants the token.
        assert requests.get(f"https://localhost:{jupyter}/api/kernels", verify=info["jupyter_ca_file"],
                            timeout=10).status_code == 403
        assert requests.get(f"http://localhost:{dashboard}/json/counts.json", timeout=10).json()["workers"] == WORKERS
    finally:
        os.killpg(tunnel.pid, 15)
        output = tunnel.communicate(timeout=30)[0]
    assert f"Jupyter Lab : https://localhost:{jupyter}/lab" in output, output
    assert f"Dashboard   : http://localhost:{dashboard}/status" in output
    assert f'client = Client("tls://localhost:{scheduler}", security=Security(' in output
    assert not any(port_open(port) for port in ports), "the tunnel outlived its process"


def test_tunnel_only_checks_the_workers_over_ssh(cluster):
    """The dashboard answers on the scheduler's machine only, and with tunnel_only the controller may reach nothing
    but SSH: the ready check asks there, over SSH, never from here.
    (configure.yml --tags dask: the always-tagged plays, select, prepare and report, and the dask role.)"""
    run = run_playbook("playbooks/configure.yml", *SITE_ARGS, "-e", "tunnel_only=true", "--tags", "dask",
                       name="configure-tunnel-only")
    assert "TASK [cluster : Wait until all workers have joined the scheduler]" not in run.output
    asked = re.search(r"TASK \[cluster : Wait until all workers have joined the scheduler \(asked on its machine\)\]"
                      r".*?\n(ok|changed): \[localhost -> ([^\](]+)", run.output, re.S)
    assert asked and asked.group(2) == SCHEDULER, run.output[-3000:]
    assert run.changed == 0, run.changed_tasks()


def test_make_ssh_runs_a_command_on_a_node(cluster):
    run = subprocess.run(["make", "ssh", f"CLUSTER={CLUSTER}", "NODE=worker-1", "CMD=hostname; id -un"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [WORKER_1, cluster["info"]["ssh_user"]]
    run = subprocess.run(["make", "ssh", f"CLUSTER={CLUSTER}", "CMD=cat /etc/hostname"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == SCHEDULER
    failing = subprocess.run(["make", "ssh", f"CLUSTER={CLUSTER}", "CMD=exit 3"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert failing.returncode != 0
    unknown = subprocess.run(["make", "ssh", f"CLUSTER={CLUSTER}", "NODE=worker-9", "CMD=true"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode != 0 and "has no machine 'worker-9'" in unknown.stderr

# ---- The services' journals (make logs) and ssh by host name (make ssh-config) ----

def test_make_logs_shows_what_a_worker_logged_prefixed_by_machine_and_service(cluster):
    marker = f"issue-26 marker {uuid.uuid4().hex}"
    log_on_worker(cluster["info"], WORKER_1, marker)
    line = logged_line(CLUSTER, marker, "NODE=worker-1", "SERVICE=worker")
    assert re.match(r"worker-1 worker +\| \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ .*distributed\.worker.*WARNING", line), line
    everything = make_logs(CLUSTER, "SINCE=1h")
    assert everything.returncode == 0, everything.stderr
    prefixes = {line.split("|", 1)[0].split()[0] + " " + line.split("|", 1)[0].split()[1]
                for line in everything.stdout.splitlines() if "|" in line}
    assert {"scheduler scheduler", "scheduler jupyter", "worker-1 worker", "worker-2 worker"} <= prefixes, prefixes
    assert any(marker in line for line in everything.stdout.splitlines() if line.startswith("worker-1 worker"))
    none = make_logs(CLUSTER, "SERVICE=autoscaler")
    assert none.returncode == 0 and none.stdout == "" and "no autoscaler service" in none.stderr
    wrong = make_logs(CLUSTER, "NODE=worker-1", "SERVICE=jupyter")
    assert wrong.returncode != 0 and "runs no jupyter service" in wrong.stderr


def test_make_logs_follow_streams_until_interrupted(cluster):
    follow = subprocess.Popen(["make", "logs", f"CLUSTER={CLUSTER}", "NODE=worker-1", "SERVICE=worker", "FOLLOW=1"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        time.sleep(3)  # journalctl --follow is running on the machine
        marker = f"issue-26 followed {uuid.uuid4().hex}"
        log_on_worker(cluster["info"], WORKER_1, marker)
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(marker in line for line in seen):
            seen.append(follow.stdout.readline())
        assert any(marker in line and line.startswith("worker-1 worker") for line in seen), seen[-20:]
    finally:
        os.killpg(follow.pid, signal.SIGINT)  # Ctrl-C
        follow.wait(timeout=15)


def test_ssh_config_reaches_every_machine_by_name_and_includes_only_when_asked(cluster, tmp_path):
    config = STATE / "ssh_config"
    assert config.is_file(), "site.yml writes it"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    home = tmp_path / "home"
    home.mkdir()
    env = dict(os.environ, HOME=str(home))
    run = subprocess.run(["make", "ssh-config", f"CLUSTER={CLUSTER}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    assert f"\nInclude {config}\n" in run.stdout
    assert not (home / ".ssh").exists(), "~/.ssh/config is changed only when asked"
    for alias, machine in ((f"{CLUSTER}-scheduler", SCHEDULER), (f"{CLUSTER}-worker-1", WORKER_1),
                           (f"{CLUSTER}-worker-2", f"dask-{CLUSTER}-worker-2")):
        ssh = subprocess.run(["ssh", "-F", str(config), alias, "true"], capture_output=True, text=True, timeout=60)
        assert ssh.returncode == 0, ssh.stderr
    ssh = subprocess.run(["ssh", "-F", str(config), f"{CLUSTER}-worker-1", "hostname"], capture_output=True,
                         text=True, timeout=60)
    assert ssh.stdout.strip() == WORKER_1
    # INCLUDE=1: the line goes at the top of ~/.ssh/config, once, and what was there stays.
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "config").write_text("Host elsewhere\n    User someone\n")
    for _ in range(2):
        run = subprocess.run(["make", "ssh-config", f"CLUSTER={CLUSTER}", "INCLUDE=1"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300, env=env)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr
    assert (home / ".ssh" / "config").read_text() == f"Include {config}\nHost elsewhere\n    User someone\n"
    ssh = subprocess.run(["ssh", "-F", str(home / ".ssh" / "config"), f"{CLUSTER}-worker-1", "true"],
                         capture_output=True, text=True, timeout=60)
    assert ssh.returncode == 0, ssh.stderr


# ---- What site.yml prints at the end, as a user copies it ----

def test_cluster_environment_reaches_every_worker_the_scheduler_and_the_kernel(cluster):
    """cluster_environment and requester_pays, as the workers' tasks, the scheduler and a notebook see them."""
    wanted = SEEN_ENVIRONMENT

    def environment(names=tuple(wanted)):
        import os as os_

        return {name: os_.environ.get(name) for name in names}

    client = client_for(cluster["info"])
    try:
        wait_for_workers(client, WORKERS, timeout=90)
        on_workers = client.run(environment)
        on_scheduler = client.run_on_scheduler(environment)
    finally:
        client.close()
    assert len(on_workers) == WORKERS and all(seen == wanted for seen in on_workers.values()), on_workers
    assert on_scheduler == wanted
    out = run_in_kernel(cluster["info"], f"import os, json\nprint('ENV', json.dumps({{n: os.environ.get(n) for n in {sorted(wanted)!r}}}))")
    (line,) = [line for line in out.splitlines() if line.startswith("ENV ")]
    assert json.loads(line[4:]) == wanted


def test_printed_connect_lines_pasted_into_python_compute_on_the_cluster(cluster, tmp_path):
    pasted = printed_connect_lines(cluster["first_run"].output)
    assert pasted[0] == "from distributed import Client, Security", pasted
    assert pasted[-1].startswith("client = Client(\"tls://"), pasted
    # In another working directory: the certificate paths in the line are absolute.
    run_pasted_lines(pasted, WORKERS, cwd=tmp_path)


def test_the_summary_is_printed_as_plain_lines_and_kept_in_readme_txt(cluster):
    output = cluster["first_run"].output
    readme = (STATE / "README.txt").read_text()
    assert readme.startswith(f"Cluster '{CLUSTER}' is ready: {WORKERS} workers")
    assert f"Tear down   : ansible-playbook teardown.yml -e provider=docker -e cluster_name={CLUSTER}" in readme
    # Printed as it is in the file: every line, unquoted, unindented, unescaped.
    shown = output.splitlines()
    first = shown.index(readme.splitlines()[0])
    assert shown[first:first + len(readme.splitlines())] == readme.splitlines()
    assert '\\"' not in readme and "msg:" not in output[output.index("Show how to use the cluster"):]
    assert stat.S_IMODE((STATE / "README.txt").stat().st_mode) == 0o600


# ---- The geospatial notebook (notebooks/geospatial.ipynb) on the cluster ----

GEO_NOTEBOOK = "geospatial.ipynb"


def geospatial_reference(notebook: dict) -> dict:
    """The notebook's summary computed here with plain numpy, from its own synthetic-data cell."""
    import warnings

    import numpy as np

    cell = next(c for c in notebook["cells"] if "synthetic-data" in c["metadata"].get("tags", []))
    synthetic: dict = {}
    exec("".join(cell["source"]), synthetic)  # the repository's own cell, numpy only
    months, rows, cols = synthetic["SYNTHETIC_SHAPE"]
    t, y, x = np.ogrid[0:months, 0:rows, 0:cols]
    red, nir = (synthetic["synthetic_band"](t, y, x, band) for band in ("red", "nir"))
    ndvi = (nir - red) / (nir + red)
    clear = ~np.isnan(ndvi)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels under clouds all year: no greenest value
        greenest = np.nanmax(ndvi, axis=0)
    return {
        "shape": [months, rows, cols],
        "mean_ndvi": np.nanmean(ndvi, axis=(1, 2)).tolist(),
        "vegetated_fraction": ((ndvi > 0.5).sum(axis=(1, 2)) / clear.sum(axis=(1, 2))).tolist(),
        "clear_fraction": clear.mean(axis=(1, 2)).tolist(),
        "greenest_mean": float(np.nanmean(greenest)),
    }


def test_geospatial_notebook_runs_every_cell_on_the_cluster_with_its_synthetic_stack(cluster):
    info = cluster["info"]
    token = Path(info["jupyter_token_file"]).read_text().strip()
    contents = info["jupyter_url"].removesuffix("/lab") + "/api/contents"
    auth = {"Authorization": f"token {token}"}
    # The notebook as Jupyter serves it: the repository's, unchanged.
    served = jupyter_get(info, f"{contents}/{GEO_NOTEBOOK}", headers=auth, params={"content": "1"})
    assert served.status_code == 200, served.text
    notebook = json.loads((ROOT / "notebooks" / GEO_NOTEBOOK).read_text())
    def sources(cells):
        return ["".join(c["source"]) for c in cells]
    assert sources(served.json()["content"]["cells"]) == sources(notebook["cells"])

    outputs = []
    with kernel_on_the_cluster(info, notebook=GEO_NOTEBOOK) as execute:
        for cell in notebook["cells"]:
            if cell["cell_type"] != "code":
                continue
            outputs.append(execute("".join(cell["source"]), timeout=600))
            if "parameters" in cell["metadata"].get("tags", []):
                # As papermill does: a cell after the parameters. Synthetic
                # whatever this network reaches, so the result is known.
                outputs.append(execute("USE_INTERNET = False"))
        # The settings file installed the packages on every worker too.
        versions = execute("print(json.dumps(client.run(lambda: [__import__(m).__version__ "
                           "for m in ('xarray', 'rioxarray', 'rasterio')])))")
        assert len(json.loads(versions)) == WORKERS, versions
        # The internet check answers quickly where a name does not resolve.
        assert execute("print(reachable('no-such-host.invalid', timeout=2))").strip() == "False"
    printed = "".join(outputs)
    assert f"Workers  : {WORKERS} with" in printed, printed
    assert "Source: synthetic" in printed, printed
    assert "Written          : geospatial-ndvi.json" in printed, printed

    result = jupyter_get(info, f"{contents}/geospatial-ndvi.json", headers=auth, params={"content": "1"})
    assert result.status_code == 200, result.text
    summary = json.loads(result.json()["content"])
    expected = geospatial_reference(notebook)
    assert summary["source"] == "synthetic"
    assert summary["shape"] == expected["shape"]
    assert summary["time"] == [f"2024-{month:02d}-01" for month in range(1, 13)]
    for key in ("mean_ndvi", "vegetated_fraction", "clear_fraction"):
        assert len(summary[key]) == expected["shape"][0], key
        for month, (got, want) in enumerate(zip(summary[key], expected[key])):
            assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (key, month, got, want)
    assert math.isclose(summary["greenest_mean"], expected["greenest_mean"], rel_tol=1e-5)
    # The synthetic fields green up in summer: a seasonal cycle, not noise.
    assert max(summary["mean_ndvi"]) - min(summary["mean_ndvi"]) > 0.1
    requests.delete(f"{contents}/geospatial-ndvi.json", headers=auth, verify=info["jupyter_ca_file"], timeout=30)


def lock_entries(text: str) -> dict[str, str]:
    """{requirement line: its hash options} of a requirements file (continuation lines joined)."""
    lines = [line.split(" #", 1)[0].strip() for line in text.replace("\\\n", " ").splitlines()]
    entries = {}
    for line in filter(None, (line for line in lines if not line.startswith("#"))):
        requirement, _, hashes = line.partition(" --hash=")
        entries[requirement.strip()] = " ".join(("--hash=" + hashes).split()) if hashes else ""
    return entries


def test_the_lock_has_hashes_and_a_tampered_wheel_is_refused_at_install(cluster, tmp_path):
    """Every package of the cluster's lock is pinned with its hashes, on the controller and on the machine; uv,
    as the dask role runs it (--require-hashes), refuses a wheel that is not the one locked, and a line
    without hashes."""
    [lock] = STATE.glob("requirements-*.txt")
    entries = lock_entries(lock.read_text())
    assert len(entries) > 50
    assert {r for r, h in entries.items() if not re.fullmatch(r"--hash=sha256:[0-9a-f]{64}( --hash=sha256:[0-9a-f]{64})*", h)} \
        == set(), "a locked package without hashes"
    on_machine = docker_exec(SCHEDULER, "cat", "/opt/dask/requirements.txt").stdout
    assert on_machine == lock.read_text()
    role = (ROOT / "roles" / "dask" / "vars" / "main.yml").read_text()
    assert "['--require-hashes'] if dask_lock_file" in role
    [toolz] = [r for r in entries if r.startswith("toolz==")]
    version = toolz.split("==", 1)[1].split(";", 1)[0].strip()
    # A wheel of that name and version whose code is not the one locked (as a poisoned mirror serves it).
    wheel = tmp_path / f"toolz-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("toolz/__init__.py", "import os; os.system('touch /tmp/poisoned')\n")
        archive.writestr(f"toolz-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: toolz\nVersion: {version}\n")
        archive.writestr(f"toolz-{version}.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"toolz-{version}.dist-info/RECORD", "")
    (tmp_path / "locked.txt").write_text(f"{toolz} {entries[toolz]}\n")
    (tmp_path / "unhashed.txt").write_text(f"{toolz}\n")
    assert docker_exec(SCHEDULER, "mkdir", "-p", "/tmp/hashcheck/mirror").returncode == 0
    for path, where in ((wheel, "mirror/"), (tmp_path / "locked.txt", ""), (tmp_path / "unhashed.txt", "")):
        subprocess.run(["docker", "cp", str(path), f"{SCHEDULER}:/tmp/hashcheck/{where}{path.name}"], check=True)
    try:
        assert docker_exec(SCHEDULER, "/usr/local/bin/uv", "venv", "-q", "/tmp/hashcheck/venv").returncode == 0
        install = ["env", "UV_CACHE_DIR=/tmp/hashcheck/cache", "/usr/local/bin/uv", "pip", "install", "--python",
                   "/tmp/hashcheck/venv/bin/python", "--no-index", "--find-links", "/tmp/hashcheck/mirror",
                   "--require-hashes", "--requirement"]
        tampered = docker_exec(SCHEDULER, *install, "/tmp/hashcheck/locked.txt")
        assert tampered.returncode != 0
        assert f"Hash mismatch for `toolz=={version}`" in tampered.stderr, tampered.stderr
        unhashed = docker_exec(SCHEDULER, *install, "/tmp/hashcheck/unhashed.txt")
        assert unhashed.returncode != 0
        assert "all requirements must have a hash" in unhashed.stderr, unhashed.stderr
        assert docker_exec(SCHEDULER, "test", "-e", "/tmp/poisoned").returncode != 0
    finally:
        docker_exec(SCHEDULER, "rm", "-rf", "/tmp/hashcheck")


def test_second_run_changes_nothing(cluster):
    # The user's edit of the getting-started notebook must survive the re-run.
    notebook = f"/var/lib/dask/notebooks/{NOTEBOOK}"
    edit = uuid.uuid4().hex
    docker_exec(SCHEDULER, "runuser", "-u", "dask", "--", "/opt/dask/venv/bin/python", "-c",
                "import json, sys; nb = json.load(open(sys.argv[1])); "
                "nb['cells'].append({'cell_type': 'markdown', 'id': sys.argv[2], 'metadata': {}, 'source': [sys.argv[2]]}); "
                "json.dump(nb, open(sys.argv[1], 'w'))", notebook, edit)
    assert edit in docker_exec(SCHEDULER, "cat", notebook).stdout
    run = run_playbook("site.yml", *SITE_ARGS, name="site-second-run")
    assert run.changed == 0, run.changed_tasks()
    assert edit in docker_exec(SCHEDULER, "cat", notebook).stdout, "the re-run replaced the user's notebook"
    # Every role found its stamp matching on every machine: nothing was configured again.
    assert f"Configured: none; skipped, their stamps match this run's inputs: {SCHEDULER}, " in run.output, \
        run.output[-3000:]
    assert not task_results(run.output, "dask : Install the Dask environment"), "the stamp did not skip the install"


def unit_state(host: str, unit: str = "dask-worker") -> tuple[str, str]:
    return (docker_exec(host, "systemctl", "is-enabled", unit).stdout.strip(),
            docker_exec(host, "systemctl", "is-active", unit).stdout.strip())


def test_a_changed_setting_reaches_every_worker_and_a_rerun_mends_what_was_broken_by_hand(cluster):
    """Stamps skip only what matches: a plain re-run with a changed worker_nthreads reconfigures every
    worker (and not the scheduler, whose inputs did not change), and starts and enables a worker stopped
    and disabled by hand; a unit file edited by hand is put back by -e converge=full, which checks all."""
    unit = "/etc/systemd/system/dask-worker.service"
    worker_2 = f"dask-{CLUSTER}-worker-2"
    docker_exec(WORKER_1, "systemctl", "disable", "--now", "dask-worker")
    assert unit_state(WORKER_1) == ("disabled", "inactive")
    run = run_playbook("site.yml", *SITE_ARGS, "-e", "worker_nthreads=2", name="site-changed-nthreads")
    assert (f"Configured: {WORKER_1}, {worker_2}; skipped, their stamps match this run's inputs: {SCHEDULER}"
            in run.output), run.output[-3000:]
    for host in (WORKER_1, worker_2):
        assert "--nthreads 2" in docker_exec(host, "cat", unit).stdout, host
    assert unit_state(WORKER_1) == ("enabled", "active")
    client = client_for(cluster["info"])
    try:
        wait_for_workers(client, WORKERS, timeout=90)
        threads = {w["name"]: w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert threads == {WORKER_1: 2, worker_2: 2}
    finally:
        client.close()

    # By hand, the unit: a plain re-run trusts the stamp (docs/working.md says so); converge=full does not.
    docker_exec(worker_2, "sh", "-c", f"echo '# edited by hand' >> {unit}")
    full = run_playbook("site.yml", *SITE_ARGS, "-e", "converge=full", name="site-converge-full")
    assert f"Configured: {SCHEDULER}, {WORKER_1}, {worker_2}; skipped" in full.output, full.output[-3000:]
    text = docker_exec(worker_2, "cat", unit).stdout
    assert "# edited by hand" not in text and "--nthreads" not in text
    assert full.recap[SCHEDULER]["changed"] == 0, full.changed_tasks()


def test_check_diff_shows_the_unit_lines_that_would_change_and_changes_nothing(cluster):
    """--check --diff with a setting that changes the workers' unit: check mode reports the change on
    each worker (and none on the scheduler), the diff is the one line the setting adds, and nothing changed.
    (One run for both: --limit is proven by a real run below.)"""
    unit = "/etc/systemd/system/dask-worker.service"
    workers = [WORKER_1, f"dask-{CLUSTER}-worker-2"]
    before = {host: docker_exec(host, "cat", unit).stdout for host in workers}
    run = run_playbook("site.yml", *SITE_ARGS, "-e", "worker_nthreads=3", "--check", "--diff", name="site-check-diff")
    for host in workers:
        assert run.recap[host]["changed"] > 0, f"check mode hid the change to the worker unit on {host}"
    assert run.recap[SCHEDULER]["changed"] == 0, run.changed_tasks()
    # The diffs are the unit's, one per worker, and each is the one line the setting adds.
    diffs = run.output.split(f"--- before: {unit}")[1:]
    assert len(diffs) == len(workers), run.output[-4000:]
    for diff in diffs:
        diff = diff[:diff.index("\n\n")]
        added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
        removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
        assert len(added) == 1 and "--nthreads 3" in added[0], diff
        assert not removed, diff
    # Nothing changed, on either worker.
    assert {host: docker_exec(host, "cat", unit).stdout for host in workers} == before
    assert "--nthreads" not in before[WORKER_1]


def test_a_run_limited_to_one_worker_configures_it_with_the_controller_steps(cluster):
    """--limit localhost,<worker>: the controller's plays (selection,
    certificates, report) and that worker; the others' facts are asked for,
    not their configuration."""
    run = run_playbook("site.yml", *SITE_ARGS, "--limit", f"localhost,{WORKER_1}", name="site-limit-one-worker")
    assert set(run.recap) == {"localhost", WORKER_1}, run.recap
    assert run.changed == 0, run.changed_tasks()
    assert "TASK [dask_worker : " in run.output
    assert "TASK [dask_scheduler : " not in run.output and "TASK [jupyterlab : " not in run.output
    # The report still describes the whole cluster.
    info = json.loads((STATE / "cluster.json").read_text())
    assert set(info["nodes"]) == {SCHEDULER, *(f"dask-{CLUSTER}-worker-{n}" for n in range(1, WORKERS + 1))}


def test_systemd_restarts_a_killed_worker(cluster):
    client = client_for(cluster["info"])
    try:
        pid = docker_exec(WORKER_1, "systemctl", "show", "-p", "MainPID", "--value", "dask-worker").stdout.strip()
        assert docker_exec(WORKER_1, "kill", "-9", pid).returncode == 0
        time.sleep(1)
        new_pid = ""
        for _ in range(60):
            new_pid = docker_exec(WORKER_1, "systemctl", "show", "-p", "MainPID", "--value", "dask-worker").stdout.strip()
            if new_pid not in ("", "0", pid):
                break
            time.sleep(0.5)
        assert new_pid not in ("", "0", pid)
        wait_for_workers(client, WORKERS, timeout=60)
        assert client.submit(lambda x: x + 1, 41, pure=False).result(timeout=30) == 42
    finally:
        client.close()


BROKEN_UNIT = "/etc/systemd/system/dask-worker.service.d/broken-by-the-test.conf"


def test_a_worker_that_cannot_start_fails_site_with_its_journal(cluster):
    """A bad setting in the worker's unit: site.yml's wait for the worker fails, and its message has the
    unit's own journal lines (the worker's error), not only a timeout."""
    setting = "[Service]\nExecStart=\nExecStart=/opt/dask/venv/bin/dask worker --no-such-option-of-the-test\n"
    docker_exec(WORKER_1, "mkdir", "-p", str(Path(BROKEN_UNIT).parent))
    docker_exec(WORKER_1, "sh", "-c", f"printf '{setting}' > {BROKEN_UNIT}")
    try:
        assert docker_exec(WORKER_1, "systemctl", "daemon-reload").returncode == 0
        docker_exec(WORKER_1, "systemctl", "restart", "dask-worker")
        # 10 health checks, not the worker's 120: the unit fails at once, waiting longer proves nothing.
        run = run_playbook("site.yml", *SITE_ARGS, "-e", "dask_service_health_retries=10", check=False,
                           name="site-broken-worker")
        assert run.returncode != 0
        assert f"dask-worker.service on {WORKER_1} did not start or become ready" in run.output, run.output[-4000:]
        failure = run.output[run.output.index(f"dask-worker.service on {WORKER_1} did not start"):]
        # The worker's own error, from its journal (dask takes the unknown word for the scheduler's address).
        start = failure.index("The last lines of its journal")
        # The message as Ansible prints it (the JSON of the result that follows has its newlines escaped).
        journal = failure[start:failure.index("\nfatal: ", start)]
        assert "--no-such-option-of-the-test" in journal and "dask-worker.service: Main process exited" in journal, \
            failure[:4000]
        assert "\\n" not in journal, "one journal line per line"
        assert f"make logs CLUSTER={CLUSTER} NODE=worker-1" in failure
        # The report says so at once, without waiting out its retries for a worker that cannot join.
        assert f"Not waiting for the cluster: a service did not start on {WORKER_1}" in run.output
        assert '"attempts": 120' not in run.output
    finally:
        docker_exec(WORKER_1, "rm", "-f", BROKEN_UNIT)
        docker_exec(WORKER_1, "systemctl", "daemon-reload")
        docker_exec(WORKER_1, "systemctl", "restart", "dask-worker")
        # Back to both workers even when an assertion above failed: the tests after this one share the cluster.
        client = client_for(cluster["info"])
        try:
            wait_for_workers(client, WORKERS, timeout=90)
        finally:
            client.close()


def test_scale_down_retires_workers_without_losing_data(cluster):
    """Scattered data has no lineage: if a worker were killed instead of
    retired through the scheduler, its share would be gone for good."""
    import numpy as np

    client = client_for(cluster["info"])
    try:
        blocks = [np.full(1000, i, dtype="int64") for i in range(40)]
        futures = client.scatter(blocks)
        holders = {addr for addrs in client.who_has(futures).values() for addr in addrs}
        assert len(holders) == WORKERS, "the data should start out on every worker"

        run = run_playbook("site.yml", *SITE_ARGS, "-e", "worker_count=1", name="site-scale-down")
        assert f"dask-{CLUSTER}-worker-2" not in docker_objects("container", CLUSTER)
        assert "Retire the workers" in run.output

        wait_for_workers(client, 1, timeout=60)
        names = {w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert names == {WORKER_1}
        assert [int(b[0]) for b in client.gather(futures)] == list(range(40))
    finally:
        client.close()


def test_teardown_that_cannot_save_the_work_removes_nothing(cluster, tmp_path):
    blocked = tmp_path / "a-file-not-a-folder"
    blocked.write_text("")
    machines = sorted(docker_objects("container", CLUSTER))
    assert machines
    run = run_playbook("teardown.yml", "-e", "provider=docker", "-e", f"cluster_name={CLUSTER}",
                       "-e", f"save_dir={blocked}", check=False, name="teardown-cannot-save")
    assert run.returncode != 0
    assert f"Could not save the work on {SCHEDULER}" in run.output
    assert "Nothing was removed" in run.output and "-e save_work=false" in run.output
    assert sorted(docker_objects("container", CLUSTER)) == machines
    assert (STATE / "cluster.json").is_file()


def test_teardown_saves_the_notebooks_then_removes_everything_and_can_run_twice(cluster):
    info = cluster["info"]
    marker = f"issue-26 kept {uuid.uuid4().hex}"
    log_on_worker(info, WORKER_1, marker)
    logged_line(CLUSTER, marker, "NODE=worker-1", "SERVICE=worker")
    assert (STATE / "ssh_config").is_file()
    notebook = save_notebook(info, "my-analysis.ipynb", "import dask\nprint('an evening of work')")
    save_file(info, "results/2026/ndvi.csv", b"month,ndvi\n1,0.42\n")
    # What code on the cluster could leave in the project's clone, to act on this machine at the next
    # `git status` there: a command as core.fsmonitor, and a link to a file of this machine.
    ran_here = Path(f"/tmp/dask-ec2-ansible-fsmonitor-{uuid.uuid4().hex}")
    planted = docker_exec(SCHEDULER, "runuser", "-u", "dask", "--", "sh", "-c",
                          f"cd {NOTEBOOKS}/{PROJECT} && git config core.fsmonitor 'touch {ran_here}; false'"
                          " && ln -s /etc/hostname escape")
    assert planted.returncode == 0, planted.stderr
    # Without save_dir: saved/<cluster>/<UTC time>/ at the repository root.
    run = run_playbook("teardown.yml", "-e", "provider=docker", "-e", f"cluster_name={CLUSTER}", name="teardown-1",
                       save_dir=None)
    saved = re.search(rf"Saved the notebook directory of {SCHEDULER} into (\S+)\.", run.output)
    assert saved, run.output[-3000:]
    dest = Path(saved[1])
    try:
        assert dest.parent == ROOT / "saved" / CLUSTER
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d{6}Z", dest.name)
        assert (dest / "my-analysis.ipynb").read_bytes() == notebook
        assert (dest / "results" / "2026" / "ndvi.csv").read_bytes() == b"month,ndvi\n1,0.42\n"
        assert (dest / "getting-started.ipynb").is_file()
        # The project's clone is work; its environment is not.
        assert (dest / PROJECT / "analysis.py").read_text() == "import six\n"
        assert not list(dest.rglob(".venv")) and not list(dest.rglob(".ipynb_checkpoints"))
        # ... and it came back inert: git runs nothing of the cluster's, the link is gone, both are noted.
        status = subprocess.run(["git", "status", "--short"], cwd=dest / PROJECT, capture_output=True, text=True)
        assert status.returncode == 0, status.stderr
        assert not ran_here.exists(), "git status in the saved project ran a command written on the cluster"
        assert "fsmonitor" in (dest / PROJECT / ".git" / "config.from-cluster").read_text()
        assert not (dest / PROJECT / "escape").is_symlink()
        assert f"removed the link {PROJECT}/escape -> /etc/hostname" in (dest / ".dask-ec2-ansible-inert.txt").read_text()
        # Every machine's journals, with the line the worker logged (worker-2 went with the scale-down).
        assert f"Saved the journals of {SCHEDULER}, {WORKER_1} into {dest}/logs." in run.output, run.output[-3000:]
        logs = dest / "logs"
        assert sorted(p.relative_to(logs).as_posix() for p in logs.rglob("*.log")) == sorted([
            f"{SCHEDULER}/dask-scheduler.log", f"{SCHEDULER}/jupyterlab.log", f"{SCHEDULER}/machine.log",
            f"{WORKER_1}/dask-worker.log", f"{WORKER_1}/machine.log"])
        assert marker in (logs / WORKER_1 / "dask-worker.log").read_text()
        assert "Start worker at" in (logs / WORKER_1 / "dask-worker.log").read_text()
        assert "Scheduler at" in (logs / SCHEDULER / "dask-scheduler.log").read_text()
        assert "Jupyter Server" in (logs / SCHEDULER / "jupyterlab.log").read_text()
    finally:
        shutil.rmtree(dest.parent)
    assert docker_objects("container", CLUSTER) == []
    assert docker_objects("network", CLUSTER) == []
    assert docker_objects("volume", CLUSTER) == []
    assert not STATE.exists() and not (STATE / "ssh_config").exists()
    again = teardown(name="teardown-2")
    assert f"Nothing saved: cluster '{CLUSTER}' has no scheduler machine any more." in again.output


def test_teardown_after_a_half_finished_site_run():
    """Machines exist but were never configured (site.yml stopped after provisioning)."""
    half = "citest-half"
    run_playbook("playbooks/provision.yml", "-e", "provider=docker", "-e", f"cluster_name={half}",
                 "-e", "worker_count=1", name="provision-half")
    try:
        assert len(docker_objects("container", half)) == 2
        assert docker_objects("network", half) == [f"dask-{half}"]
    finally:
        teardown(half, name="teardown-half")
    assert docker_objects("container", half) == []
    assert docker_objects("network", half) == []
    assert not (ROOT / ".clusters" / half).exists()
