"""What comes back from a cluster (teardown's saved work, sync down) cannot act on the controller.

The module dask_ec2_inert, run as the playbooks run it (through Ansible, on
localhost), on a tree as hostile code on a cluster could leave it: a cloned
project whose git configuration runs a command at `git status`, hooks, a bare
repository, a submodule link and symbolic links pointing out of the tree."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, VENV_BIN

GIT = ["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "-c", "init.defaultBranch=main"]


def inert(path: Path, *args: str) -> dict:
    run = subprocess.run([str(VENV_BIN / "ansible"), "localhost", "-o", "-m", "dask_ec2_ansible.cluster.dask_ec2_inert",
                          "-a", f"path={path}", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.split(" => ", 1)[1])


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GIT, *args], cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture
def hostile(tmp_path):
    """A saved tree as a compromised notebook could leave it, and the file its commands would make."""
    marker, tree = tmp_path / "the-cluster-ran-this", tmp_path / "saved"
    project = tree / "analysis"
    project.mkdir(parents=True)
    (project / "a.py").write_text("print(1)\n")
    assert git(project, "init", "-q").returncode == 0
    assert git(project, "add", "a.py").returncode == 0
    assert git(project, "commit", "-qm", "work").returncode == 0
    assert git(project, "config", "core.fsmonitor", f"touch {marker}; false").returncode == 0
    hook = project / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    assert git(tree, "clone", "-q", "--bare", "analysis", "mirror.git").returncode == 0
    assert git(tree / "mirror.git", "config", "core.fsmonitor", f"touch {marker}").returncode == 0
    (tree / "vendored").mkdir()
    (tree / "vendored" / ".git").write_text(f"gitdir: {tmp_path}/elsewhere/.git\n")
    (tree / "credentials").symlink_to(Path.home() / ".aws" / "credentials")
    (project / "up").symlink_to("../../..")
    (project / "same").symlink_to("a.py")
    return tree, marker


def test_a_hostile_tree_is_made_inert_and_nothing_of_it_is_lost(hostile):
    tree, marker = hostile
    # Without the module the cluster's command runs here at the first git status.
    git(tree / "analysis", "status")
    assert marker.exists(), "the test's attack must work on the untreated tree"
    marker.unlink()

    checked = inert(tree, "--check")
    assert checked["changed"] and (tree / "analysis" / ".git" / "hooks").is_dir(), "check mode changes nothing"
    result = inert(tree)
    assert result["changed"]
    for where in (tree / "analysis", tree / "mirror.git"):
        assert git(where, "status").returncode in (0, 128)
    assert git(tree / "analysis", "checkout", "-q", "HEAD", "--", "a.py").returncode == 0
    assert git(tree / "analysis", "log", "--format=%s").stdout == "work\n"
    assert git(tree / "mirror.git", "log", "--format=%s").stdout == "work\n"
    assert not marker.exists(), "git ran a command the cluster wrote"
    # Set aside, not deleted: the cluster's configuration and hooks, and a note of every change.
    assert "fsmonitor" in (tree / "analysis" / ".git" / "config.from-cluster").read_text()
    assert (tree / "analysis" / ".git" / "hooks.from-cluster" / "post-checkout").is_file()
    assert (tree / "analysis" / ".git" / "config").read_text() == "[core]\n\trepositoryformatversion = 0\n"
    assert (tree / "vendored" / ".git.from-cluster").is_file() and not (tree / "vendored" / ".git").exists()
    links = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_symlink())
    assert links == ["analysis/same"]
    note = (tree / ".dask-ec2-ansible-inert.txt").read_text()
    assert f"removed the link credentials -> {Path.home()}/.aws/credentials (it points outside)" in note
    assert "removed the link analysis/up -> ../../.. (it points outside)" in note
    # Once inert, it stays so: a second pass finds nothing.
    assert inert(tree)["changed"] is False


def test_a_plain_tree_is_left_as_it_is(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("x\n1\n")
    (tmp_path / "latest.csv").symlink_to("results/table.csv")
    before = sorted(os.listdir(tmp_path))
    assert inert(tmp_path) == {"changed": False, "changes": []}
    assert sorted(os.listdir(tmp_path)) == before
