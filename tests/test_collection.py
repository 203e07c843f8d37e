"""The repository as the collection dask_ec2_ansible.cluster: built with
ansible-galaxy, installed elsewhere, and used by name from a playbook that is
not in the repository, as another project would use it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ARTIFACTS, ROOT, VENV_BIN, PlaybookRun, docker_available, docker_exec

NAMESPACE, NAME = "dask_ec2_ansible", "cluster"
COLLECTION = f"{NAMESPACE}.{NAME}"
# Plugin types whose documentation ansible-doc shows, as directories of plugins/.
DOC_TYPES = {"modules": "module", "lookup": "lookup", "filter": "filter", "test": "test",
             "inventory": "inventory", "callback": "callback"}
IMAGE = "dask-ec2-ansible/debian:12"


def galaxy():
    return yaml.safe_load((ROOT / "galaxy.yml").read_text())


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The collection built from the checkout and installed into a collections
    path of its own (its dependencies come with the ansible package)."""
    tmp = tmp_path_factory.mktemp("collection")
    build = subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp), str(ROOT)],
                           capture_output=True, text=True, cwd=tmp)
    assert build.returncode == 0, build.stdout + build.stderr
    (artifact,) = tmp.glob(f"{NAMESPACE}-{NAME}-*.tar.gz")
    collections = tmp / "collections"
    # --force and a collections path of its own: a copy already installed elsewhere on this machine
    # (~/.ansible/collections, say) would otherwise make ansible-galaxy install nothing here.
    install_env = dict(os.environ, ANSIBLE_COLLECTIONS_PATH=str(collections))
    install = subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "install", "--no-deps", "--force", "-p",
                              str(collections), str(artifact)], capture_output=True, text=True, cwd=tmp, env=install_env)
    assert install.returncode == 0, install.stdout + install.stderr
    assert (collections / "ansible_collections" / NAMESPACE / NAME / "MANIFEST.json").is_file(), install.stdout
    # Away from the checkout: no ansible.cfg of ours, no .collections link.
    project = tmp / "elsewhere"
    project.mkdir()
    (project / "ansible.cfg").write_text("[defaults]\ngathering = explicit\nretry_files_enabled = false\n")
    env = dict(os.environ, ANSIBLE_CONFIG=str(project / "ansible.cfg"), ANSIBLE_COLLECTIONS_PATH=str(collections),
               ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1", PY_COLORS="0")
    return {"artifact": artifact, "collections": collections, "project": project, "env": env,
            "path": collections / "ansible_collections" / NAMESPACE / NAME}


def test_galaxy_yml_names_the_collection_and_its_license():
    meta = galaxy()
    assert (meta["namespace"], meta["name"]) == (NAMESPACE, NAME)
    assert meta["license"] == ["BSD-3-Clause"]
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text()
    # Every collection the roles use is a dependency, at the range requirements.yml pins.
    pins = {c["name"]: c["version"] for c in yaml.safe_load((ROOT / "requirements.yml").read_text())["collections"]}
    assert meta["dependencies"] == pins


def test_the_artifact_holds_the_collection_and_none_of_the_checkouts_state(installed):
    with tarfile.open(installed["artifact"]) as tar:
        names = tar.getnames()
    for wanted in ("MANIFEST.json", "meta/runtime.yml", "plugins/modules/dask_ec2_launch.py",
                   "plugins/module_utils/dask_ec2_retry.py", "roles/dask_worker/tasks/main.yml",
                   "tests/sanity/ignore-2.19.txt", "LICENSE"):
        assert wanted in names, wanted
    unwanted = re.compile(r"^(\.venv|\.cache|\.collections|\.clusters|\.emulator|saved|bench|tests/artifacts|"
                          r"tests/output|scripts)(/|$)|\.pyc$|^tests/[^/]+\.py$|/molecule/")
    assert not [n for n in names if unwanted.search(n)]


def test_the_checkout_resolves_as_the_collection():
    """make setup links the checkout into .collections/ (ansible.cfg's collections_path)."""
    link = ROOT / ".collections" / "ansible_collections" / NAMESPACE / NAME
    assert link.is_symlink() and link.resolve() == ROOT
    out = subprocess.run([str(VENV_BIN / "ansible-doc"), "-t", "module", "--list", COLLECTION, "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert set(json.loads(out)) == {f"{COLLECTION}.{p.stem}" for p in (ROOT / "plugins" / "modules").glob("*.py")}


def plugin_names(installed, plugin_type: str) -> set[str]:
    out = subprocess.run([str(VENV_BIN / "ansible-doc"), "-t", plugin_type, "--list", COLLECTION, "--json"],
                         cwd=installed["project"], env=installed["env"], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("directory", sorted(DOC_TYPES))
def test_every_plugin_documentation_loads_and_has_examples(installed, directory):
    plugin_type = DOC_TYPES[directory]
    files = sorted(p.stem for p in (ROOT / "plugins" / directory).glob("*.py") if p.stem != "__init__")
    assert files, directory
    names = plugin_names(installed, plugin_type)
    # Every file is listed (a file whose documentation does not load is not).
    if plugin_type not in ("filter", "test"):
        assert names == {f"{COLLECTION}.{stem}" for stem in files}
    assert names
    out = subprocess.run([str(VENV_BIN / "ansible-doc"), "-t", plugin_type, "--json", *sorted(names)],
                         cwd=installed["project"], env=installed["env"], capture_output=True, text=True)
    assert out.returncode == 0 and "ERROR" not in out.stderr, out.stderr
    docs = json.loads(out.stdout)
    assert set(docs) == names
    for name, doc in docs.items():
        assert doc["doc"]["short_description"], name
        assert doc["doc"]["author"], name
        assert doc["doc"]["version_added"], name
        # A description is prose: a "key: value" in a flow mapping would turn it into a dict.
        assert all(isinstance(line, str) for line in doc["doc"]["description"]), name
        assert (doc.get("examples") or "").strip(), f"{name} has no EXAMPLES"


def test_a_module_runs_by_its_collection_name_from_the_installed_artifact(installed, tmp_path):
    """dask_ec2_cost imports its module_utils the collection way; priced from the table, offline."""
    playbook = installed["project"] / "cost.yml"
    table = yaml.safe_load((ROOT / "roles" / "provider_aws" / "files" / "ec2_prices.yml").read_text())
    playbook.write_text(yaml.safe_dump([{
        "name": "Price two machines", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [{"name": "Estimate", "dask_ec2_ansible.cluster.dask_ec2_cost": {
            "machines": [{"region": "eu-west-1", "instance_type": "t3.large", "count": 2}],
            "price_table": table, "price_list_api": False, "region": "eu-west-1"},
            "register": "cost"},
            {"name": "Show", "ansible.builtin.debug": {"msg": "HOURLY={{ cost.hourly_usd }}"}}]}]))
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), str(playbook)], cwd=installed["project"],
                          env=installed["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    hourly = float(re.search(r"HOURLY=([0-9.]+)", proc.stdout).group(1))
    assert hourly == pytest.approx(2 * table["instances"]["eu-west-1"]["t3.large"])


@pytest.fixture
def machine():
    """One local systemd machine (the local provider's base image), removed afterwards."""
    if not docker_available():
        pytest.skip("needs a Docker engine (make docker)")
    name = f"col-collection-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--name", name, "--cap-add", "SYS_ADMIN", "--cgroupns", "host",
                    "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw", "--tmpfs", "/run", "--tmpfs", "/run/lock",
                    "--stop-signal", "SIGRTMIN+3", IMAGE, "/sbin/init"], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


PLAYBOOK = """\
---
# Another project's playbook: our roles by their collection names.
- name: Prepare a machine for Dask with the collection's roles
  hosts: machines
  gather_facts: false
  vars:
    common_extra_ca_bundle: "{{ lookup('ansible.builtin.env', 'EXTRA_CA_BUNDLE') }}"
  pre_tasks:
    - name: Wait until systemd has booted
      ansible.builtin.command: systemctl is-system-running --wait
      register: boot
      changed_when: false
      failed_when: boot.stdout not in ['running', 'degraded']

    - name: Gather facts
      ansible.builtin.setup:
        gather_subset: [min]
  roles:
    - role: dask_ec2_ansible.cluster.common
    - role: dask_ec2_ansible.cluster.uv
"""


def test_the_installed_collection_configures_a_machine_from_a_playbook_outside_the_repository(installed, machine):
    project = installed["project"]
    (project / "site.yml").write_text(PLAYBOOK)
    (project / "hosts.yml").write_text(yaml.safe_dump(
        {"machines": {"hosts": {machine: {"ansible_connection": "community.docker.docker",
                                          "ansible_python_interpreter": "/usr/bin/python3"}}}}))
    env = dict(installed["env"])
    env.setdefault("EXTRA_CA_BUNDLE", os.environ.get("SSL_CERT_FILE", ""))

    def run(name: str) -> PlaybookRun:
        args = [str(VENV_BIN / "ansible-playbook"), "-i", "hosts.yml", "site.yml"]
        proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=900)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.log").write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        return PlaybookRun(args, proc.returncode, proc.stdout + proc.stderr)

    first = run("collection-first-run")
    # The roles ran by their collection names (the only collections path is the installed one).
    assert f"TASK [{COLLECTION}.uv : " in first.output and f"TASK [{COLLECTION}.common : " in first.output
    assert first.recap[machine]["changed"] > 0
    uv_version = yaml.safe_load((installed["path"] / "roles" / "uv" / "defaults" / "main.yml").read_text())["uv_version"]
    assert docker_exec(machine, "runuser", "-u", "nobody", "--", "uv", "--version").stdout.split()[1] == uv_version
    assert docker_exec(machine, "id", "-u", "dask").returncode == 0, "the common role's service user is missing"
    second = run("collection-second-run")
    assert second.recap[machine]["changed"] == 0, second.changed_tasks()
