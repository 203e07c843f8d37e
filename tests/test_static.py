"""Checks that need no machines: lint, specs, variable wiring, input validation."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, VENV_BIN, docker_available, docker_objects, extra_ca_args, run_playbook

ROLES = sorted(p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir())


def test_yamllint_strict():
    proc = subprocess.run([str(VENV_BIN / "yamllint"), "--strict", "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ansible_lint_production_profile():
    proc = subprocess.run(
        [str(VENV_BIN / "ansible-lint"), "--profile", "production", "--nocolor"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


def test_no_blanket_lint_skips():
    config = yaml.safe_load((ROOT / ".ansible-lint").read_text())
    assert not config.get("skip_list"), "skip rules on their line with # noqa and a reason"
    assert not config.get("warn_list"), "warn_list hides findings"
    assert config["profile"] == "production"


@pytest.mark.parametrize("role", ROLES)
def test_role_defaults_match_argument_specs(role):
    """Every public variable is documented and validated; nothing documented is missing."""
    role_dir = ROOT / "roles" / role
    defaults = yaml.safe_load((role_dir / "defaults" / "main.yml").read_text()) or {}
    specs = yaml.safe_load((role_dir / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    options = specs["main"].get("options", {})
    assert set(defaults) == set(options), (
        f"defaults only: {sorted(set(defaults) - set(options))}; specs only: {sorted(set(options) - set(defaults))}"
    )
    for name in defaults:
        assert name.startswith(f"{role}_"), f"{name} is not prefixed with {role}_"
        assert options[name].get("description"), f"{name} has no description"


HARDENING = ROOT / "roles" / "dask_service" / "templates" / "etc" / "systemd" / "system" / "hardening.j2"


def test_the_hardening_is_written_once():
    text = HARDENING.read_text()
    for directive in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=", "PrivateTmp=yes",
                      "ProtectHome=yes", "ProtectKernelTunables=yes", "ProtectKernelModules=yes",
                      "ProtectControlGroups=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies="):
        assert directive in text, f"the hardening lacks {directive}"
    units = [u for u in (ROOT / "roles").rglob("*.service.j2") if "idle-shutdown" not in u.name]
    assert not [u for u in units if "NoNewPrivileges" in u.read_text()], "hardening written again in a unit"


@pytest.mark.parametrize("role", ROLES)
def test_role_unit_templates_are_hardened(role):
    for unit in (ROOT / "roles" / role / "templates").rglob("*.service.j2"):
        text = unit.read_text()
        assert text.startswith("{{ ansible_managed | comment }}"), unit
        if unit.name.endswith("idle-shutdown.service.j2"):
            # The one root unit: it runs nothing of Dask's, only rm and poweroff.
            commands = [line.split("=", 1)[1].split()[0] for line in text.splitlines() if line.startswith("ExecStart=")]
            assert commands == ["/usr/bin/rm", "/usr/bin/systemctl"], unit
            assert "Type=oneshot" in text
            continue
        for directive in ("User=", "Restart=always", "LimitNOFILE="):
            assert directive in text, f"{unit.name} lacks {directive}"
        assert re.search(r"^\{\{ hardening\(\[[a-z_]+\]\) \}\}$", text, re.MULTILINE), f"{unit.name} is not hardened"
        assert "User=root" not in text


def test_top_level_group_vars_reach_imported_playbooks():
    """Ansible loads group_vars/ next to the inventory or the playbook, not next to
    site.yml for a play imported from playbooks/. inventory/group_vars links to
    the top-level group_vars/; this proves the values arrive, defaults and -e."""
    run = run_playbook("tests/playbooks/group_vars_probe.yml")
    line = re.search(r"PROBE .*", run.output).group(0)
    assert "cluster_name=dask " in line
    assert "worker_count=2 " in line
    assert "worker_memory_limit_role=auto" in line  # group_vars/workers.yml
    assert re.search(r"lock=requirements-[0-9a-f]{12}\.txt", line)

    run = run_playbook("tests/playbooks/group_vars_probe.yml", "-e", "cluster_name=other", "-e", "worker_memory_limit=3GiB")
    line = re.search(r"PROBE .*", run.output).group(0)
    assert "cluster_name=other " in line
    assert "worker_memory_limit_role=3GiB" in line


OS_FAMILY_DEFAULTS = [
    # The local provider: the Debian whose system Python is the controller's...
    (["-e", "provider=docker", "-e", "controller_python_version=3.11"], "debian-12"),
    (["-e", "provider=docker", "-e", "controller_python_version=3.13"], "debian-13"),
    # ...else the current Debian.
    (["-e", "provider=docker", "-e", "controller_python_version=3.12"], "debian-13"),
    (["-e", "provider=docker", "-e", "controller_python_version=3.14"], "debian-13"),
    # aws: Debian 13 whatever the controller runs; an explicit choice wins.
    (["-e", "provider=aws", "-e", "controller_python_version=3.11"], "debian-13"),
    (["-e", "provider=docker", "-e", "os_family=debian-13", "-e", "controller_python_version=3.11"], "debian-13"),
    (["-e", "provider=aws", "-e", "os_family=ubuntu-24.04"], "ubuntu-24.04"),
]


@pytest.mark.parametrize(("args", "expected"), OS_FAMILY_DEFAULTS, ids=[" ".join(a) for a, _ in OS_FAMILY_DEFAULTS])
def test_os_family_default_follows_the_provider_and_the_controllers_python(args, expected):
    run = run_playbook("tests/playbooks/group_vars_probe.yml", *args)
    assert f"os_family={expected} " in re.search(r"PROBE .*", run.output, re.S).group(0)


def test_controller_python_is_the_python_running_ansible():
    probe = subprocess.run([str(VENV_BIN / "python"), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    run = run_playbook("tests/playbooks/group_vars_probe.yml")
    assert f"controller_python={probe}" in run.output


def test_os_family_tables_agree():
    """The operating systems each part knows: settings, the two providers, the
    image script, the EC2 emulator (each image's Python too)."""
    internal = yaml.safe_load((ROOT / "group_vars" / "all" / "internal.yml").read_text())
    spec = yaml.safe_load((ROOT / "roles" / "cluster" / "meta" / "argument_specs.yml").read_text())
    docker = yaml.safe_load((ROOT / "roles" / "provider_docker" / "defaults" / "main.yml").read_text())
    aws = yaml.safe_load((ROOT / "roles" / "provider_aws" / "defaults" / "main.yml").read_text())
    choices = set(spec["argument_specs"]["validate"]["options"]["os_family"]["choices"])
    assert set(internal["os_family_python"]) == choices
    assert set(aws["provider_aws_images"]) == choices
    assert set(docker["provider_docker_images"]) == set(internal["docker_os_families"])
    assert set(internal["docker_os_families"]) <= choices
    script = (ROOT / "scripts" / "build-base-image").read_text()
    emulator = (ROOT / "scripts" / "ec2-emulator").read_text()
    for os_family, image in docker["provider_docker_images"].items():
        assert f"{os_family})" in script, f"build-base-image cannot build {os_family}"
        assert image.rsplit(":", 1)[1] in script
        python = internal["os_family_python"][os_family]
        assert re.search(rf'"{os_family}": \{{"docker_image": "{re.escape(image)}".*"python": "{python}"', emulator), \
            f"ec2-emulator's OS_IMAGES lacks {os_family} ({image}, Python {python})"


BAD_INPUTS = [
    (["-e", "worker_count=0"], "worker_count must be a whole number of at least 1"),
    (["-e", "worker_count=two"], "worker_count"),
    (["-e", "scale_minimum=5"], "scale_minimum must be a whole number from worker_count (2"),
    (["-e", "adaptive=true"], "adaptive=true needs an autoscaler"),
    (["-e", "adaptive_interval=0s"], "adaptive_interval must be a duration above 0"),
    (["-e", "adaptive_target_duration=soon"], "adaptive_target_duration must be a duration"),
    (["-e", "adaptive_wait_count=0"], "adaptive_wait_count must be a whole number of at least 1"),
    (["-e", "cluster_name=My_Cluster"], "cluster_name 'My_Cluster' is not usable"),
    (["-e", "worker_memory_limit=lots"], "worker_memory_limit must be"),
    (["-e", "dask_version=2025.1.0"], "older than 2026.6.0"),
    (["-e", "dask_version=latest"], "dask_version must be a Dask release"),
    (["-e", "provider=gcp"], "provider"),
    (["-e", "jupyter_port=8786"], "must be three different ports"),
    (["-e", "extra_ca_bundle=/nonexistent/ca.pem"], "is not a file on this machine"),
    (["-e", "jupyter_project_repo=my project"], "jupyter_project_repo must be a git URL"),
    (["-e", "os_family=ubuntu-24.04"], "is not available on the local provider"),
    (["-e", "os_family=amazonlinux-2023"], "its system Python is 3.9"),
    (["-e", "save_dir=.clusters/mine"], "save_dir must be a directory on this machine outside"),
    (["-e", "save_dir="], "save_dir must be a directory on this machine outside"),
    (["-e", "provider=aws", "-e", "base_image=dask-ec2-ansible/dask:x"],
     "base_image (dask-ec2-ansible/dask:x) is an image of the local provider"),
    (["-e", "python_index_url=http://mirror.lab.example/simple"],
     "python_index_url must be an https:// (or file://) URL of a package index"),
    # The secret of an index URL is not printed, not even in its refusal.
    (["-e", "python_index_url=http://student:hunter2-s3cret@mirror.lab.example/simple"],
     "(got 'http://student:****@mirror.lab.example/simple')"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_refused_before_anything_is_created(args, message):
    cluster = ["-e", "cluster_name=badinput"] if "cluster_name" not in " ".join(args) else []
    run = run_playbook("site.yml", "-e", "provider=docker", *cluster, *args, check=False)
    assert run.returncode != 0
    assert message in run.output, run.output[-3000:]
    assert "hunter2-s3cret" not in run.output
    # Validation is the first play: nothing was provisioned.
    assert "Provision the cluster's machines" not in run.output
    if docker_available():
        assert docker_objects("container", "badinput") == []
        assert docker_objects("network", "badinput") == []
    assert not (ROOT / ".clusters" / "badinput").exists()


# --limit: the machines join the scheduler and workers groups in plays on
# localhost, so a limit without localhost is refused before anything runs
# (tests/test_cluster.py: what --limit localhost,<machine> does).
LIMITED = "dask-collimit-worker-1"


@pytest.mark.parametrize("limit", [LIMITED, f"{LIMITED},dask-collimit-scheduler", "all", "!localhost"])
@pytest.mark.parametrize("playbook", ["site.yml", "teardown.yml", "playbooks/configure.yml"])
def test_a_limit_without_localhost_is_refused_with_what_to_type(playbook, limit):
    # The machines of a cluster "collimit", as the inventory would list them.
    hosts = ["-i", f"{LIMITED},dask-collimit-scheduler,"]
    run = run_playbook(playbook, "-e", "provider=docker", "-e", "cluster_name=collimit", *hosts, "--limit", limit,
                       check=False)
    assert run.returncode != 0
    assert f"--limit {limit} leaves out localhost" in run.output, run.output[-3000:]
    assert f"--limit localhost,{limit}" in run.output
    # Nothing else ran: no play on localhost, no task on a machine.
    assert "PLAY [Validate the controller and the cluster settings]" not in run.output
    assert set(run.recap) <= {LIMITED, "dask-collimit-scheduler"}
    assert all(host["changed"] == 0 for host in run.recap.values())
    assert not (ROOT / ".clusters" / "collimit").exists()


@pytest.mark.parametrize("limit", [f"localhost,{LIMITED}", f"{LIMITED}:localhost", f"127.0.0.1,{LIMITED}"])
def test_a_limit_with_localhost_passes_the_check(limit):
    # --tags never: only the always-tagged plays (checks, selection) run; the
    # selection then finds no cluster "collimit" in this inventory and stops.
    run = run_playbook("site.yml", "-e", "provider=docker", "-e", "cluster_name=collimit",
                       "-i", f"{LIMITED},", "--limit", limit, "--tags", "never", check=False)
    assert "leaves out localhost, where" not in run.output, run.output[-3000:]
    assert "PLAY [Validate the controller and the cluster settings]" in run.output, run.output[-3000:]


def test_without_a_limit_no_machine_of_another_cluster_shows_in_the_run():
    # The check picks its play's first host; with a machine of another cluster (or provider) first in
    # the inventory, that machine showed in the recap, skipped (seen with both providers' clusters up).
    run = run_playbook("site.yml", "-e", "provider=docker", "-e", "cluster_name=collimit",
                       "-i", "dask-othercluster-worker-1,", "--tags", "never", check=False)
    assert "PLAY [Refuse a --limit that leaves out localhost]" in run.output, run.output[-3000:]
    assert set(run.recap) == {"localhost"}, run.output[-3000:]


# --- No secrets in the repository ------------------------------------------

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{40}"),
    "private key": re.compile(r"-----BEGIN ((RSA|DSA|EC|OPENSSH|ENCRYPTED) )?PRIVATE KEY-----"),
    "Jupyter token in a URL": re.compile(r"[?&]token=[A-Za-z0-9]{32,}"),
}


def find_secrets(text: str) -> list[str]:
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


def test_the_secret_scanner_finds_secrets():
    # Built at run time so that no secret-looking string is in the repository.
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert find_secrets(f"aws_access_key_id = {key_id}") == ["AWS access key id"]
    assert find_secrets("aws_secret_access_key=" + "a" * 40) == ["AWS secret access key"]
    assert find_secrets("-----BEGIN " + "OPENSSH PRIVATE KEY-----\nabc") == ["private key"]
    assert find_secrets("http://10.0.0.1:8888/lab?token=" + "x1" * 24) == ["Jupyter token in a URL"]
    assert find_secrets("nothing to see: AKIA-like words, BEGIN PUBLIC KEY") == []


def test_no_secrets_in_tracked_files():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    found = []
    for name in filter(None, files.split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        found += [f"{name}: {kind}" for kind in find_secrets(text)]
    assert found == []


def test_gitignore_keeps_cluster_state_and_keys_out():
    ignored = [".clusters/demo/ssh/id_ed25519", ".clusters/demo/tls/ca.key", "id_rsa", "mykey.pem",
               ".aws/credentials", "credentials"]
    proc = subprocess.run(["git", "check-ignore", "--no-index", *ignored], cwd=ROOT, capture_output=True, text=True)
    assert sorted(proc.stdout.split()) == sorted(ignored)


def test_misspelled_setting_is_refused_with_a_suggestion():
    run = run_playbook("playbooks/preflight.yml", "-e", "provider=docker", "-e", "worker_cuont=3", check=False)
    assert run.returncode != 0
    assert "'worker_cuont' is not a setting of this toolkit: did you mean worker_count?" in run.output
    # Role variables passed on purpose are not typos.
    run = run_playbook("playbooks/preflight.yml", "-e", "provider=docker", "-e", "dask_worker_nthreads=3")
    assert run.returncode == 0


def test_getting_started_notebook_is_valid_and_has_no_outputs():
    """Outputs stay out of the repository; the notebook joins the cluster with what the toolkit wrote."""
    import json

    notebook = json.loads((ROOT / "notebooks" / "getting-started.ipynb").read_text())
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(ids) == len(set(ids))
    code = []
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code"), cell
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "clear the outputs before committing"
            code.append("".join(cell["source"]))
    source = "\n".join(code)
    # No address, no certificates: $DASK_CONFIG on the machine names the cluster.
    assert "cluster = Cluster()" in source and "client = Client(cluster)" in source
    assert not re.search(r"(tls|tcp)://|[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+", source)
    assert "storage_options" in source and "READ_FROM_S3 = False" in source


def test_geospatial_notebook_is_valid_has_no_outputs_and_forces_nothing():
    """Outputs stay out of the repository; the tests find its parameters and synthetic-data cells by tag."""
    import json

    notebook = json.loads((ROOT / "notebooks" / "geospatial.ipynb").read_text())
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 5
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert len({cell["id"] for cell in notebook["cells"]}) == len(notebook["cells"])
    tags = {}
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code"), cell
        assert isinstance(cell["source"], list) and all(isinstance(line, str) for line in cell["source"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "clear the outputs before committing"
        for tag in cell["metadata"].get("tags", []):
            tags[tag] = "".join(cell["source"])
    source = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert "client = Client()" in source
    assert not re.search(r"(tls|tcp)://|[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+", source)
    # It decides by itself (internet or synthetic) unless the user says otherwise.
    assert re.search(r"^USE_INTERNET = None$", tags["parameters"], re.MULTILINE)
    # The synthetic data need numpy alone (tests/test_cluster.py runs that cell on the controller).
    imports = re.findall(r"^\s*(?:import|from) (\w+)", tags["synthetic-data"], re.MULTILINE)
    assert imports == ["numpy"], imports
    # The internet-only packages are imported where they are used, not at the top.
    assert not re.search(r"^(import|from) (rioxarray|rasterio|pyproj)", source, re.MULTILINE)


def test_geospatial_settings_file_sets_settings_that_exist():
    values = yaml.safe_load((ROOT / "notebooks" / "geospatial.yml").read_text())
    assert set(values) <= set(settings_spec()), sorted(set(values) - set(settings_spec()))
    assert {"xarray", "rioxarray"} <= set(values["extra_python_packages"])


def test_a_text_for_people_is_printed_as_it_is(tmp_path):
    """The project's stdout callback prints a debug msg marked show_as_text as plain lines; others as before."""
    text = 'client = Client("tls://10.0.0.1:8786", security=Security(tls_ca_file="/a b/ca.pem"))'
    playbook = tmp_path / "show.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Show", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [
            {"name": "As text", "ansible.builtin.debug": {"msg": f"Ready:\n\n{text}\nEnd"},
             "vars": {"show_as_text": True}},
            {"name": "As a result", "ansible.builtin.debug": {"msg": f"Ready:\n{text}"}},
        ],
    }]))
    out = run_playbook(str(playbook), "-i", "localhost,").output
    plain = out[out.index("TASK [As text]"):out.index("TASK [As a result]")].splitlines()
    assert plain[2:6] == ["Ready:", "", text, "End"], plain
    assert "ok: [localhost]" not in "\n".join(plain)
    assert 'Client(\\"tls://' in out[out.index("TASK [As a result]"):]
    verbose = run_playbook(str(playbook), "-i", "localhost,", "-v").output
    assert 'Client(\\"tls://' in verbose[verbose.index("TASK [As text]"):verbose.index("TASK [As a result]")]


# --- One list of the user settings ------------------------------------------

def settings_spec() -> dict:
    specs = yaml.safe_load((ROOT / "roles" / "cluster" / "meta" / "argument_specs.yml").read_text())["argument_specs"]
    return {k: v for k, v in specs["validate"]["options"].items() if k != "cluster_validate_purpose"}


def test_settings_have_one_list_of_names_types_and_defaults():
    """The validate entry point's argument spec is the list; group_vars/all/main.yml gives each its default."""
    defaults = yaml.safe_load((ROOT / "group_vars" / "all" / "main.yml").read_text())
    spec = settings_spec()
    assert set(spec) == set(defaults), (
        f"defaults only: {sorted(set(defaults) - set(spec))}; spec only: {sorted(set(spec) - set(defaults))}")
    assert all(option.get("type") and option.get("description") for option in spec.values())


def settings_rows(text: str) -> dict[str, str]:
    """The rows of a page's settings tables, by the setting(s) named in their first cell."""
    rows = {}
    for line in re.findall(r"^\| `[a-z0-9_]+`(?:, `[a-z0-9_]+`)* \|.*$", text, re.MULTILINE):
        first = line.split(" | ", 1)[0]
        rows.update({name: line for name in re.findall(r"`([a-z0-9_]+)`", first)})
    return rows


def test_settings_reference_documents_every_setting_and_no_other():
    rows = settings_rows((ROOT / "docs" / "settings.md").read_text())
    spec = set(settings_spec())
    assert spec - set(rows) == set(), f"settings missing from docs/settings.md's tables: {sorted(spec - set(rows))}"
    assert set(rows) - spec == set(), f"rows of docs/settings.md that are no setting: {sorted(set(rows) - spec)}"


def test_readme_shows_ten_settings_as_the_reference_has_them():
    """The front page's short table is rows of the reference, copied exactly (so it cannot drift)."""
    front = settings_rows((ROOT / "README.md").read_text())
    reference = settings_rows((ROOT / "docs" / "settings.md").read_text())
    assert len(front) == 10, sorted(front)
    for name, row in front.items():
        assert name in reference, f"README shows {name}, which docs/settings.md does not"
        # links are relative to each page: compare the rows without their targets
        assert re.sub(r"\]\([^)]*\)", "]", row) == re.sub(r"\]\([^)]*\)", "]", reference[name]), name


def test_wrong_type_of_a_setting_is_refused_by_its_spec():
    run = run_playbook("playbooks/preflight.yml", "-e", "provider=docker", "-e", "dask_tls=maybe", check=False)
    assert run.returncode != 0
    assert "dask_tls" in run.output and "bool" in run.output, run.output[-2000:]


# Debian release names of the base images Molecule runs every scenario on.
DEBIAN_RELEASES = {"12": "bookworm", "13": "trixie"}


def test_every_role_declares_the_platforms_it_is_tested_on():
    config = yaml.safe_load((ROOT / ".config" / "molecule" / "config.yml").read_text())
    tested = sorted(DEBIAN_RELEASES[p["image"].rsplit(":", 1)[1]] for p in config["platforms"])
    assert tested == ["bookworm", "trixie"]
    for role in sorted(p.name for p in (ROOT / "roles").iterdir() if p.is_dir()):
        meta = yaml.safe_load((ROOT / "roles" / role / "meta" / "main.yml").read_text())["galaxy_info"]
        assert meta["platforms"] == [{"name": "Debian", "versions": tested}], role
        assert (meta["role_name"], meta["namespace"], meta["license"]) == (role, "dask_ec2_ansible", "BSD-3-Clause")


# --- Wrong shapes and cluster_environment, refused before anything exists -----

def shaped_settings() -> list[tuple[str, str]]:
    return sorted((name, option["type"]) for name, option in settings_spec().items() if option["type"] in ("list", "dict"))


def refused_before_anything(run, name: str = "badinput") -> None:
    assert run.returncode != 0
    assert "Provision the cluster's machines" not in run.output
    if docker_available():
        assert docker_objects("container", name) == []
    assert not (ROOT / ".clusters" / name).exists()


def test_every_list_or_mapping_setting_of_another_shape_is_refused_by_name():
    """One run with every such setting wrong (the checks report them all): a string, as -e name=value
    and a JSON string give, and a number for regions (which also takes "eu-west-1,us-east-1")."""
    import json

    lists = [name for name, kind in shaped_settings() if kind == "list"]
    mappings = [name for name, kind in shaped_settings() if kind == "dict"]
    assert "extra_python_packages" in lists and "cluster_environment" in mappings
    wrong = {name: 5 if name == "regions" else "numpy" for name in lists if name != "extra_python_packages"}
    run = run_playbook("site.yml", "-e", "provider=docker", "-e", "cluster_name=badinput",
                       "-e", "extra_python_packages=numpy; touch x", "-e", json.dumps(wrong), check=False)
    refused_before_anything(run)
    for name in lists:
        assert f"{name} must be a list" in run.output, (name, run.output[-3000:])
    run = run_playbook("site.yml", "-e", "provider=docker", "-e", "cluster_name=badinput",
                       "-e", json.dumps(dict.fromkeys(mappings, "numpy")), check=False)
    refused_before_anything(run)
    for name in mappings:
        assert name in run.output, (name, run.output[-3000:])



def test_packages_that_cannot_be_locked_are_refused_and_leave_no_state():
    """The lock is made before any machine; when it is refused, the state directory this run made
    (its .in file, and no SSH key yet) goes too: .clusters/ holds nothing of a cluster that never was."""
    run = run_playbook("site.yml", "-e", "provider=docker", "-e", "cluster_name=badinput",
                       "-e", '{"extra_python_packages": ["dask-ec2-ansible-no-such-package-7f3a"]}',
                       *extra_ca_args(), check=False)
    assert "cannot be installed together, so no machine was changed" in run.output, run.output[-3000:]
    assert "dask-ec2-ansible-no-such-package-7f3a" in run.output
    assert run.returncode != 0
    if docker_available():
        assert docker_objects("container", "badinput") == [] and docker_objects("network", "badinput") == []
    assert not (ROOT / ".clusters" / "badinput").exists()

BAD_ENVIRONMENTS = [
    ({"PATH": "/tmp"}, "may not set PATH"),
    ({"LD_PRELOAD": "x.so"}, "may not set LD_PRELOAD"),
    ({"PYTHONPATH": "/x"}, "may not set PYTHONPATH"),
    ({"DASK_CONFIG": "/x"}, "may not set DASK_CONFIG"),
    ({"HOME": "/root"}, "may not set HOME"),
    ({"1BAD": "x"}, "1BAD is not a variable name"),
    ({"AWS_SECRET_ACCESS_KEY": "x"}, "looks like a secret (AWS_SECRET_ACCESS_KEY)"),
    ({"AWS_SESSION_TOKEN": "x"}, "looks like a secret (AWS_SESSION_TOKEN)"),
    ({"DB_PASSWORD": "x"}, "looks like a secret (DB_PASSWORD)"),
    ({"KEY_ID": "AKIA" + "ABCDEFGHIJKLMNOP"}, "looks like a secret (KEY_ID)"),
    ({"SOMETHING": "a" * 20 + "B/" * 10}, "looks like a secret (SOMETHING)"),
]


def test_cluster_environment_refuses_names_and_secrets_before_anything():
    """One run with every bad name and value (the checks report them all), no secret-looking value printed."""
    import json

    environment = {name: value for bad, _ in BAD_ENVIRONMENTS for name, value in bad.items()}
    run = run_playbook("site.yml", "-e", "provider=docker", "-e", "cluster_name=badinput",
                       "-e", json.dumps({"cluster_environment": environment}), check=False)
    refused_before_anything(run)
    lines = run.output.splitlines()
    for bad, message in BAD_ENVIRONMENTS:
        (name,) = bad
        # The checks name every offender of a kind in one message: "may not set PATH, LD_PRELOAD: ...".
        phrase = message.split(" (")[0].replace(name, "").strip()
        assert any(phrase in line and name in line for line in lines), (message, run.output[-3000:])
    for value in environment.values():
        if len(value) >= 20:
            assert value not in run.output, "a secret-looking value was printed"
    assert "s3_read_buckets" in run.output and "iam_instance_profile" in run.output
