"""Scaling from Python on the EC2 emulator, with no controller process running while the cluster scales:
scale_maximum above worker_count starts an autoscaler on the scheduler's machine (its own user and instance
profile); in a Jupyter kernel of the cluster, Cluster().scale(n) asks the scheduler, the autoscaler launches the
workers from the baked image, cloud-init boots them, each enrolls for a certificate of its own and joins;
scale(1) retires them through the scheduler with every result kept, and they are terminated. From this machine,
Cluster.from_file(cluster.json) scales the same cluster, and a second site.yml changes nothing and leaves the
autoscaler's workers alone. teardown.yml then leaves no instance and no role.

Its own emulator (name and network), so that it runs beside the other emulator tests."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time

import pytest
import requests

from cluster_checks import (chromium_page, client_for, kernel_on_the_cluster, log_in_to_lab, run_in_kernel,
                            task_results)
from emulator import running_emulator, wait_until
from conftest import ARTIFACTS, ROOT, docker_available, extra_ca_args, run_playbook

boto3 = pytest.importorskip("boto3")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not docker_available(), reason="needs a Docker engine (make docker)"),
]

EMULATOR = "dask-ec2-emulator-scale-test"
# Not make demo-aws's (10.213), test_aws_cluster's (10.214), the bench's (10.215) or test_bake_aws's (10.216).
CIDR = "10.217.0.0/20"
REGION = "eu-west-1"
CLUSTER = "scaleaws"
STATE = ROOT / ".clusters" / CLUSTER
SCHEDULER = f"dask-{CLUSTER}-scheduler"
CLUSTER_TAG = "dask-ec2-ansible:cluster"
SCALE = ["-e", "worker_count=1", "-e", "scale_maximum=4"]
AUTOSCALER_SETTINGS_TASK = "dask_autoscaler : Write the autoscaler's settings (how to launch a worker, and what the worker gets)"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with running_emulator(tmp_path_factory.mktemp("ec2-emulator-scale"), EMULATOR, CIDR, REGION) as emulator:
        yield emulator


def aws(emulator, service: str):
    return boto3.client(service, region_name=REGION, endpoint_url=emulator["endpoint"],
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def args(emulator, *extra: str) -> list[str]:
    return ["-e", f"@{emulator['state'] / 'vars.yml'}", *extra_ca_args(), *extra]


def live(emulator) -> list[dict]:
    pages = aws(emulator, "ec2").get_paginator("describe_instances").paginate(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [CLUSTER]},
                 {"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}])
    return [i for page in pages for r in page["Reservations"] for i in r["Instances"]]


def tags(instance: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


@pytest.fixture(scope="module")
def cluster(emulator):
    bake = run_playbook("bake.yml", *args(emulator, *SCALE), env=emulator["env"], name="scale-aws-bake")
    image_id = re.search(r"Baked (ami-[0-9a-f]+):", bake.output).group(1)
    try:
        first = run_playbook("site.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}", *SCALE,
                                               "-e", f"ami_id={image_id}"),
                             env=emulator["env"], name="scale-aws-site")
        yield {"first": first, "emulator": emulator, "image_id": image_id,
               "info": json.loads((STATE / "cluster.json").read_text())}
    finally:
        teardown = run_playbook("teardown.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}"), env=emulator["env"],
                                name="scale-aws-teardown", check=False)
        assert teardown.returncode == 0, teardown.output[-3000:]
        assert live(emulator) == []
        roles = aws(emulator, "iam").list_roles(PathPrefix="/dask-ec2-ansible/")["Roles"]
        assert [r["RoleName"] for r in roles if CLUSTER in r["RoleName"]] == []
        profiles = aws(emulator, "iam").list_instance_profiles(PathPrefix="/dask-ec2-ansible/")["InstanceProfiles"]
        assert [p["InstanceProfileName"] for p in profiles if CLUSTER in p["InstanceProfileName"]] == []


def ssh(info, *command: str) -> subprocess.CompletedProcess:
    scheduler = info["nodes"][SCHEDULER]
    return subprocess.run(["ssh", "-i", info["ssh_key"], "-o", "StrictHostKeyChecking=accept-new",
                           "-o", f"UserKnownHostsFile={STATE / 'known_hosts'}", "-o", "IdentitiesOnly=yes",
                           f"{info['ssh_user']}@{scheduler}", *command], capture_output=True, text=True, timeout=60)


def test_the_autoscaler_runs_on_the_scheduler_as_its_own_user_with_the_clusters_profile(cluster):
    info = cluster["info"]
    assert info["scaling"] == {"provider": "aws", "workers": 1, "minimum": 1, "maximum": 4, "adaptive": False,
                               "autoscaler": True, "scale_minimum": 1}
    # The estimate before the launch counted the largest size (max_hourly_cost holds at it).
    assert re.search(r"3 x \S+.*workers the autoscaler may add", cluster["first"].output), cluster["first"].output[-4000:]
    state = ssh(info, "systemctl", "show", "-p", "ActiveState", "-p", "User", "dask-autoscaler.service")
    assert "ActiveState=active" in state.stdout and "User=dask-autoscaler" in state.stdout, state.stdout + state.stderr
    (scheduler,) = [i for i in live(cluster["emulator"]) if tags(i)["dask-ec2-ansible:role"] == "scheduler"]
    assert scheduler["IamInstanceProfile"]["Arn"].endswith(f"/dask-{CLUSTER}-{REGION}-autoscaler")
    # The issuing key is the autoscaler's alone; the cluster CA's key never left this machine.
    key = ssh(info, "sudo stat -c '%U %a' /etc/dask-ec2-ansible/autoscaler/issuing.key")
    assert key.stdout.strip() == "dask-autoscaler 600", key.stdout + key.stderr
    found = ssh(info, "sudo", "find", "/etc", "/var/lib", "/opt/dask", "-name", "ca.key")
    assert found.returncode == 0 and found.stdout.strip() == "", found.stdout + found.stderr
    assert (STATE / "tls" / "ca.key").is_file()


def autoscaled(emulator) -> list[dict]:
    return [i for i in live(emulator) if tags(i).get("dask-ec2-ansible:autoscaled") == "true"]


def assert_enrollments_are_refused(info, enrolled: str, work) -> None:
    """From this machine (not an instance's address): a replay for a worker that enrolled, and an instance the
    autoscaler never launched, are refused, and its journal says why."""
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(work / "k.pem"), "-out", str(work / "r.pem"), "-subj", f"/CN={enrolled}"],
                   check=True, capture_output=True)
    url = f"https://{info['nodes'][SCHEDULER]}:8795/enroll"
    for instance_id in (enrolled, "i-0123456789abcdef0"):
        answer = requests.post(url, json={"instance_id": instance_id, "token": "guessed",
                                          "csr": (work / "r.pem").read_text()}, verify=info["tls"]["ca_file"], timeout=30)
        assert answer.status_code == 403 and "certificate" not in answer.json(), answer.text
    journal = ssh(info, "sudo", "journalctl", "-u", "dask-autoscaler", "--no-pager", "-o", "cat").stdout
    assert f"{enrolled} has enrolled already (a replayed token)" in journal, journal[-3000:]
    assert "i-0123456789abcdef0 is no instance this autoscaler launched" in journal, journal[-3000:]


def test_scale_from_a_kernel_launches_workers_that_enroll_join_and_compute_then_scale_down_keeps_the_results(
        cluster, tmp_path):
    """The Done-when's notebook: Cluster(), Client(cluster), scale(4), compute, scale(1) with every result kept;
    all of it in a kernel on the cluster, this test process only watching EC2."""
    emulator, info = cluster["emulator"], cluster["info"]
    with kernel_on_the_cluster(info) as execute:
        out = execute(
            "import time\nfrom dask_ec2_ansible import Cluster\nfrom distributed import Client\n"
            "cluster = Cluster()\nclient = Client(cluster)\nstart = time.monotonic()\ncluster.scale(4)\n"
            "client.wait_for_workers(4, timeout=300)\nprint('joined', round(time.monotonic() - start))\n"
            "print('computed', sum(client.gather(client.map(lambda i: i * i, range(30)))), len(client.run(lambda: 1)))\n"
            "futures = client.scatter(list(range(100)))\n"
            "print('spread', len({w for f in futures for w in client.who_has([f])[f.key]}))\n"
            "print('names', sorted(w['name'] for w in client.scheduler_info()['workers'].values()))", timeout=360)
        assert f"computed {sum(i * i for i in range(30))} 4" in out and "spread 4" in out, out
        instances = autoscaled(emulator)
        assert len(instances) == 3
        ids = sorted(i["InstanceId"] for i in instances)
        assert f"names {sorted([f'dask-{CLUSTER}-worker-1', *ids])}" in out, out
        for instance in instances:
            assert tags(instance)["Name"] == f"dask-{CLUSTER}-worker-{instance['InstanceId']}"
            assert tags(instance)[CLUSTER_TAG] == CLUSTER
            assert instance["ImageId"] == cluster["image_id"]
        assert_enrollments_are_refused(info, ids[0], tmp_path)
        out = execute(
            "cluster.scale(1)\ndeadline = time.monotonic() + 180\n"
            "while len(client.scheduler_info()['workers']) > 1 and time.monotonic() < deadline:\n    time.sleep(1)\n"
            "print('left', len(client.scheduler_info()['workers']))\n"
            "print('kept', client.gather(futures) == list(range(100)))", timeout=240)
        assert "left 1" in out and "kept True" in out, out
    print(out)
    wait_until(lambda: autoscaled(emulator) == [], 120, "the autoscaled workers terminated")
    fixed = [i for i in live(emulator) if tags(i)["dask-ec2-ansible:role"] == "worker"]
    assert [tags(i)["Name"] for i in fixed] == [f"dask-{CLUSTER}-worker-1"]


def test_from_the_controller_the_same_cluster_scales_and_a_second_site_run_leaves_its_workers_alone(cluster):
    """Cluster.from_file(cluster.json) on this machine scales the same cluster; a re-run of site.yml with the same
    settings then changes nothing and stops none of the autoscaler's workers (it does not fight it)."""
    from dask_ec2_ansible import Cluster

    emulator, info = cluster["emulator"], cluster["info"]
    with Cluster.from_file(STATE / "cluster.json") as attached:
        attached.scale(2)
        # The autoscaler killed while its launch is in flight (the instance there, not joined yet): systemd starts
        # it again, and it finds the instance by its tags instead of launching another.
        wait_until(lambda: autoscaled(emulator), 60, "the launch")
        killed = ssh(info, "sudo", "systemctl", "kill", "--signal=KILL", "dask-autoscaler.service")
        assert killed.returncode == 0, killed.stderr
        wait_until(lambda: len(attached.scheduler_info["workers"]) == 2, 300, "2 workers joined")
        restarts = ssh(info, "systemctl", "show", "-p", "NRestarts", "--value", "dask-autoscaler.service")
        assert int(restarts.stdout.strip()) >= 1, restarts.stdout
        time.sleep(12)   # two more decisions of the restarted autoscaler
        (instance,) = autoscaled(emulator)
        again = run_playbook("site.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}", *SCALE,
                                               "-e", f"ami_id={cluster['image_id']}"),
                             env=emulator["env"], name="scale-aws-site-again")
        assert again.changed == 0, again.changed_tasks()
        # Every role found its stamp matching on every machine, the autoscaler's too: its files were not looked at.
        assert "Configured: none; skipped, their stamps match this run's inputs" in again.output, again.output[-3000:]
        assert not task_results(again.output, AUTOSCALER_SETTINGS_TASK), "the autoscaler's stamp did not skip its files"
        assert [i["InstanceId"] for i in autoscaled(emulator)] == [instance["InstanceId"]]
        assert len(attached.scheduler_info["workers"]) == 2
        # A changed input of the autoscaler's still reaches it on a plain run, stamp or not: its settings change,
        # it restarts, and it keeps its worker.
        changed = run_playbook("site.yml", *args(emulator, "-e", f"cluster_name={CLUSTER}", *SCALE,
                                                 "-e", f"ami_id={cluster['image_id']}", "-e", "adaptive_interval=4s"),
                               env=emulator["env"], name="scale-aws-site-changed")
        assert [line.split(" =>")[0] for line in task_results(changed.output, AUTOSCALER_SETTINGS_TASK)] == \
            [f"changed: [{SCHEDULER}]"], changed.output[-3000:]
        settings = ssh(info, "sudo", "cat", "/etc/dask-ec2-ansible/autoscaler/autoscaler.json")
        assert json.loads(settings.stdout)["interval"] == "4s", settings.stdout + settings.stderr
        assert f"Configured: {SCHEDULER};" in changed.output, changed.output[-3000:]
        time.sleep(10)   # two decisions of the restarted autoscaler
        assert [i["InstanceId"] for i in autoscaled(emulator)] == [instance["InstanceId"]]
        assert len(attached.scheduler_info["workers"]) == 2
        status = attached.autoscaler_status()
        assert status["mode"] == "fixed" and list(status["instances"]) == [instance["InstanceId"]], status
        # make status: the mode and limits (cluster.json here) and the autoscaler's workers (EC2).
        shown = run_playbook("playbooks/status.yml", "-e", f"regions={REGION}", env=emulator["env"],
                             name="scale-aws-status")
        (row,) = [line for line in shown.output.splitlines() if f"{CLUSTER} " in line and REGION in line]
        assert "manual 1-4, 1 autoscaled" in row, row
        report = json.loads((ROOT / ".clusters" / "status.json").read_text())
        (found,) = [c for c in report["clusters"] if c["name"] == CLUSTER]
        assert found["scaling"] == {"minimum": 1, "maximum": 4, "mode": "manual"} and found["autoscaled_workers"] == 1
    # A kernel's Cluster() sees the same limits.
    out = run_in_kernel(info, "from dask_ec2_ansible import Cluster\nc = Cluster()\nprint(c.limits['maximum'])")
    assert out.strip() == "4"


def test_adapt_from_a_kernel_grows_for_a_queued_graph_never_beyond_the_maximum_and_shrinks_back(cluster):
    """cluster.adapt(minimum=0, maximum=4) in a kernel, then a graph of 300 sleeping tasks: the autoscaler follows
    Dask's adaptive_target, the cluster grows (to 4; minimum=0 is clamped to 1), the graph finishes,
    and the cluster shrinks back to site.yml's worker (the floor: worker_count is at least 1), with the scheduler
    and Jupyter still there. EC2, watched all along, never holds more than 4 workers or a duplicate launch."""
    emulator, info = cluster["emulator"], cluster["info"]
    most, launched, watching = [0], set(), threading.Event()

    def watch():
        while not watching.is_set():
            workers = [i for i in live(emulator) if tags(i)["dask-ec2-ansible:role"] == "worker"]
            most[0] = max(most[0], len(workers))
            launched.update(i["InstanceId"] for i in workers if tags(i).get("dask-ec2-ansible:autoscaled"))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with kernel_on_the_cluster(info) as execute:
            out = execute(
                "import time, warnings\nfrom dask_ec2_ansible import Cluster\nfrom distributed import Client\n"
                "cluster = Cluster()\nclient = Client(cluster)\n"
                "with warnings.catch_warnings(record=True) as said:\n"
                "    warnings.simplefilter('always')\n"
                "    asked = cluster.adapt(minimum=0, maximum=4, target_duration='5s', wait_count=2)\n"
                "print('asked', asked.minimum, asked.maximum, len(said))\n"
                "futures = client.map(time.sleep, [0.5] * 300, pure=False)\nbiggest = 0\n"
                "while not all(f.done() for f in futures):\n"
                "    biggest = max(biggest, len(client.scheduler_info()['workers']))\n    time.sleep(0.5)\n"
                "client.gather(futures)\nprint('finished with at most', biggest)", timeout=400)
            assert "asked 1 4 1" in out and "finished with at most 4" in out, out
            wait_until(lambda: autoscaled(emulator) == [], 240, "the cluster shrank back to site.yml's worker")
            out = execute("print('left', len(client.scheduler_info()['workers']), "
                          "cluster.autoscaler_status()['mode'])", timeout=60)
            assert "left 1 adaptive" in out, out
    finally:
        watching.set()
        watcher.join()
    assert most[0] == 4, "grew to the maximum, never beyond it"
    # The worker the test before left, and two launches more: no duplicate, no launch and terminate in between.
    assert len(launched) == 3, launched


def test_in_chromium_the_labs_dask_panel_shows_the_cluster_and_its_scale_dialog_changes_the_worker_count(
        cluster, tmp_path):
    """The Lab's Dask panel (dask-labextension's cluster manager, our Cluster as its factory) lists this cluster;
    SCALE, 2 workers, as a user would click it: the autoscaler launches one, and it joins."""
    emulator, info = cluster["emulator"], cluster["info"]
    with chromium_page(info, tmp_path, f"dask-{CLUSTER} CA") as page:
        log_in_to_lab(page, info)
        if not page.locator(".dask-ClusterManager").is_visible():
            page.click(".jp-SideBar .lm-TabBar-tab[data-id='dask-dashboard-launcher']")
        item = page.locator(".dask-ClusterListingItem").filter(has_text=CLUSTER)
        item.wait_for()
        page.screenshot(path=ARTIFACTS / "scale-aws-dask-panel.png")
        item.locator(".dask-ClusterListingItem-scale").click()
        dialog = page.locator(".jp-Dialog")
        dialog.locator("input.dask-ScalingInput").first.fill("2")
        page.screenshot(path=ARTIFACTS / "scale-aws-scale-dialog.png")
        dialog.locator("button.jp-mod-accept").click()
        client = client_for(info)
        try:
            wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) == 2, 300,
                       "2 workers after the Scale dialog")
        finally:
            client.close()
        assert len(autoscaled(emulator)) == 1
        item.filter(has_text="Number of Workers: 2").wait_for(timeout=30_000)
        page.screenshot(path=ARTIFACTS / "scale-aws-dask-panel-scaled.png")
