"""ansible-test sanity on the collection, offline (scripts/sanity): every
test ansible-test runs by default passes, with only reasoned ignores."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

from conftest import ARTIFACTS, ROOT

IGNORE = ROOT / "tests" / "sanity" / "ignore-2.19.txt"


def sanity(*args: str, source=None, timeout: int = 1200) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, **({"SANITY_SOURCE": str(source)} if source else {}))
    return subprocess.run([str(ROOT / "scripts" / "sanity"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_ansible_test_sanity_passes():
    start = time.monotonic()
    proc = sanity()
    elapsed = time.monotonic() - start
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "sanity.log").write_text(f"{elapsed:.0f} s\n" + proc.stdout + proc.stderr)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # The default set ran, not a subset.
    ran = set(re.findall(r'Running sanity test "([\w-]+)"', proc.stdout + proc.stderr))
    assert {"validate-modules", "ansible-doc", "import", "pep8", "pylint", "compile", "yamllint",
            "runtime-metadata", "shebang", "symlinks"} <= ran, ran


def test_sanity_reports_a_real_finding(tmp_path):
    """The same pipeline fails on a collection with a pep8 error (a line longer than 160)."""
    source = tmp_path / "collection"
    source.mkdir()
    for name in ("galaxy.yml", "README.md", "LICENSE", "CHANGELOG.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("meta", "plugins", "tests/sanity"):
        shutil.copytree(ROOT / name, source / name)
    module = source / "plugins" / "modules" / "dask_ec2_cost.py"
    module.write_text(module.read_text() + "\nTOO_LONG = '" + "x" * 170 + "'\n")
    proc = sanity("--test", "pep8", source=source, timeout=600)
    assert proc.returncode != 0
    assert re.search(r"plugins/modules/dask_ec2_cost\.py:\d+:\d+: E501", proc.stdout + proc.stderr), proc.stdout[-3000:]


def test_every_ignore_is_the_license_rule_with_its_reason():
    lines = [line for line in IGNORE.read_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry, _, reason = line.partition(" # ")
        path, rule = entry.split()
        assert (ROOT / path).is_file(), line
        # Only the rule that does not apply to a BSD-3-Clause collection.
        assert rule == "validate-modules:missing-gplv3-license", line
        assert "BSD-3-Clause" in reason, line
        assert "BSD-3-Clause" in (ROOT / path).read_text()[:300], f"{path} does not say its license"
