"""Every role's own Molecule scenario (converge, idempotence, verify) on the
local base images, Debian 12 and 13 at once (two platforms in
.config/molecule/config.yml), scenario after scenario (they share the
instance names)."""

from __future__ import annotations

import os
import subprocess

import pytest

from conftest import ARTIFACTS, ROOT, VENV_BIN, docker_available

SCENARIO_ROLES = sorted(
    p.parent.parent.parent.name for p in (ROOT / "roles").glob("*/molecule/default/molecule.yml")
)

pytestmark = [
    pytest.mark.molecule,
    pytest.mark.skipif(not docker_available(), reason="needs a Docker engine (make docker)"),
]


def test_every_role_with_tasks_has_a_scenario():
    roles = {p.name for p in (ROOT / "roles").iterdir() if (p / "tasks").is_dir()}
    # These run on the controller, not on a machine: provider_docker drives
    # the Docker engine, provider_aws the EC2 API (tests/test_aws.py, moto),
    # dask_tls makes certificates (tests/test_cluster.py proves mutual TLS),
    # cluster is the playbooks' part (the end-to-end tests). dask_service is
    # the shape of a service that the dask_scheduler, dask_worker and
    # jupyterlab scenarios run. dask_autoscaler's scenario has neither EC2 nor
    # a scheduler: tests/test_autoscaler.py (moto) and tests/test_scale_aws.py
    # (the emulator) prove what it decides.
    assert roles - set(SCENARIO_ROLES) <= {"provider_docker", "provider_aws", "dask_tls", "cluster", "dask_service"}


# make test runs the common scenario on both Debians; the scenarios that
# install the Dask environment take minutes each and run with make test-slow
# (and make molecule). The same roles run in every cluster test, the local
# one on Debian 12 and the EC2 emulator's on Debian 13.
IN_MAKE_TEST = {"common"}


@pytest.mark.parametrize("role", [
    role if role in IN_MAKE_TEST else pytest.param(role, marks=pytest.mark.slow) for role in SCENARIO_ROLES
])
def test_molecule_scenario(role):
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", ANSIBLE_FORCE_COLOR="0", PY_COLORS="0",
               NO_COLOR="1")
    env.setdefault("EXTRA_CA_BUNDLE", os.environ.get("SSL_CERT_FILE", ""))
    (ROOT / ".cache" / "uv").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(VENV_BIN / "molecule"), "test"], cwd=ROOT / "roles" / role, env=env,
                          capture_output=True, text=True, timeout=1200)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"molecule-{role}.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
