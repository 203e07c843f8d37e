"""The local EC2 emulator (scripts/ec2-emulator) as the tests run it: in the
foreground, each test module with a name and network of its own, always
stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conftest import ROOT, VENV_BIN


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    """The first true value of predicate(), polled until timeout; else fail saying what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout} s: {what}")


@contextmanager
def running_emulator(state: Path, name: str, cidr: str, region: str) -> Iterator[dict]:
    """scripts/ec2-emulator run, until it is ready; yields what it wrote (endpoint, env, ...) with an
    environment that points the aws tools at it and at nothing else, its state folder and its process."""
    log = (state / "run.log").open("w")
    process = subprocess.Popen(
        [str(VENV_BIN / "python"), str(ROOT / "scripts" / "ec2-emulator"), "run", "--state-dir", str(state),
         "--name", name, "--cidr", cidr, "--region", region, "--uv-cache", str(ROOT / ".cache" / "uv")],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        ready = wait_until(lambda: (state / "ready.json").is_file() and json.loads((state / "ready.json").read_text())
                           or process.poll() is not None and {"died": True}, 120, "the emulator is ready")
        assert "died" not in ready, (state / "run.log").read_text()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | ready["env"]
        yield {**ready, "env": env, "state": state, "process": process}
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        log.close()
