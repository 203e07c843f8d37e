"""Shared helpers: run the project's playbooks the way a user would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
ARTIFACTS = ROOT / "tests" / "artifacts"

RECAP_LINE = re.compile(
    r"^(?P<host>\S+)\s+: ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


@dataclass
class PlaybookRun:
    args: list[str]
    returncode: int
    output: str

    @property
    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP per host: {'host': {'ok': n, 'changed': n, ...}}."""
        return {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP_LINE.finditer(self.output)
        }

    @property
    def changed(self) -> int:
        return sum(host["changed"] for host in self.recap.values())

    def changed_tasks(self) -> list[str]:
        """Names of the tasks that reported 'changed' (for readable failures)."""
        tasks, current = [], None
        for line in self.output.splitlines():
            if line.startswith("TASK [") or line.startswith("RUNNING HANDLER ["):
                current = line.split("[", 1)[1].rsplit("]", 1)[0]
            elif line.startswith("changed:") and current:
                tasks.append(f"{current}: {line}")
        return tasks


def extra_ca_args() -> list[str]:
    # Same default as the Makefile: the bundle this machine trusts, if named.
    bundle = os.environ.get("EXTRA_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE", "")
    return ["-e", f"extra_ca_bundle={bundle}"] if bundle else []


def run_playbook(
    playbook: str, *extra: str, check: bool = True, name: str | None = None, env: dict[str, str] | None = None,
    save_dir: Path | None = ARTIFACTS / "saved",
) -> PlaybookRun:
    """Run ansible-playbook from the project root; keep its log as an artifact.

    env, when given, is the whole environment of the run (e.g. one pointing at
    a local EC2 API); the process's own environment is never changed.
    save_dir: where teardown.yml saves the notebooks first (among the test
    artifacts, not in the repository's saved/); None: the playbook's default."""
    if playbook == "teardown.yml" and save_dir and not any(arg.startswith("save_dir=") for arg in extra):
        extra = (*extra, "-e", f"save_dir={save_dir}")
    args = [str(VENV_BIN / "ansible-playbook"), playbook, *extra]
    env = dict(env if env is not None else os.environ, ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1", PY_COLORS="0")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    if name:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / f"{name}.log").write_text(output)
    run = PlaybookRun(args, proc.returncode, output)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args[1:])} failed (rc={proc.returncode}):\n{output[-6000:]}")
    return run


def docker_available() -> bool:
    if not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def docker_objects(kind: str, cluster: str) -> list[str]:
    """Names of docker containers/networks/volumes labelled with the cluster."""
    label = f"label=dask-ec2-ansible.cluster={cluster}"
    if kind == "container":
        cmd = ["docker", "ps", "-a", "--filter", label, "--format", "{{.Names}}"]
    else:
        cmd = ["docker", kind, "ls", "--filter", label, "--format", "{{.Name}}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if line]


def docker_exec(container: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", "exec", container, *cmd], capture_output=True, text=True)


# The four longest test files (about 12 to 18 minutes each when two run at once), first and in this
# order: make test's two processes (pytest-xdist, --dist loadfile --no-loadscope-reorder) each start
# with two of them, the first and third, the second and fourth, and the short files fill in behind.
# In collection order, two of them started last, together, and the run ended on them (41 min).
LONGEST_FIRST = ("test_aws_cluster.py", "test_cluster.py", "test_scale_aws.py", "test_aws.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first; a stable sort, so each file keeps its own order."""
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
