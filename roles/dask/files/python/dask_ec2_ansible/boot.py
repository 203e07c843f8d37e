"""A worker the autoscaler launched, at its first boot (cloud-init runs this as root from its user data).

    /opt/dask/venv/bin/python -m dask_ec2_ansible.boot /etc/dask-ec2-ansible/worker.json

The image has the environment already (bake.yml); this gives the machine what is per worker: a key made
here, a certificate for it from the autoscaler (enrollment with the one-time token of the user data, which
is then worthless), the worker's account and unit, named after its instance id, and starts it.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pathlib
import pwd
import ssl
import subprocess
import time
import urllib.error
import urllib.request


def _environment_file() -> dict[str, str]:
    # The EC2 emulator's endpoints are in /etc/environment (on EC2 there are none: the defaults apply).
    found = {}
    try:
        for line in pathlib.Path("/etc/environment").read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                key, _sep, value = line.partition("=")
                found[key.strip()] = value.strip().strip('"')
    except OSError:
        pass
    return found


def metadata(path: str) -> str:
    """IMDSv2: a session token, then the value."""
    endpoint = (os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
                or _environment_file().get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or "http://169.254.169.254/")
    endpoint = endpoint.rstrip("/")
    put = urllib.request.Request(f"{endpoint}/latest/api/token", method="PUT",
                                 headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    with urllib.request.urlopen(put, timeout=10) as answer:
        token = answer.read().decode()
    get = urllib.request.Request(f"{endpoint}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": token})
    with urllib.request.urlopen(get, timeout=10) as answer:
        return answer.read().decode().strip()


def ensure_account(user: str, groups: list[str], home: str) -> None:
    for group in [user, *groups]:
        try:
            grp.getgrnam(group)
        except KeyError:
            subprocess.run(["groupadd", "--system", group], check=True)
    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(["useradd", "--system", "--gid", user, "--groups", ",".join(groups), "--home-dir", home,
                        "--no-create-home", "--shell", "/usr/sbin/nologin", user], check=True)


def enroll(url: str, body: dict, context: ssl.SSLContext, patience: float = 300, sleep=time.sleep) -> str:
    """The certificate, from the autoscaler. Not answering (not listening yet, restarting, a 5xx) is tried again
    for `patience` seconds; a refusal (4xx) is final: trying again would not help."""
    delay, deadline = 1.0, time.monotonic() + patience
    while True:
        failure = ""
        request = urllib.request.Request(url, method="POST", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as answer:
                return json.loads(answer.read())["certificate"]
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise
            failure = str(error)
        except OSError as error:
            failure = str(error)
        if time.monotonic() + delay > deadline:
            raise RuntimeError(f"the autoscaler at {url} did not answer within {patience:.0f} s: {failure}")
        print(f"dask-ec2-ansible: enrollment not answered ({failure}); trying again in {delay:.0f} s", flush=True)
        sleep(delay)
        delay = min(delay * 2, 20)


def main(config: dict) -> None:
    instance_id = metadata("instance-id")
    tls_dir = pathlib.Path(config["tls_dir"])
    tls_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    ensure_account(config["user"], [config["tls_group"]], config["local_directory"])
    tls_gid = grp.getgrnam(config["tls_group"]).gr_gid
    key = tls_dir / "node.key"
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True)
    os.chown(key, 0, tls_gid)
    key.chmod(0o640)
    csr = subprocess.run(["openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={instance_id}"],
                         capture_output=True, text=True, check=True).stdout
    (tls_dir / "ca.pem").write_text(config["trust"])
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
    context.check_hostname = False   # the scheduler's certificate names its address, which we have as an IP
    certificate = enroll(config["enroll_url"], {"instance_id": instance_id, "token": config["token"], "csr": csr},
                         context)
    (tls_dir / "node.pem").write_text(certificate)
    local = pathlib.Path(config["local_directory"])
    local.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.chown(local, pwd.getpwnam(config["user"]).pw_uid, grp.getgrnam(config["user"]).gr_gid)
    unit = pathlib.Path("/etc/systemd/system/dask-worker.service")
    unit.write_text(config["unit"].replace("@WORKER_NAME@", instance_id))
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", "--now", "dask-worker.service"], check=True)
    print(f"dask-ec2-ansible: {instance_id} enrolled and its worker started")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=pathlib.Path)
    args = parser.parse_args()
    path = args.config
    settings = json.loads(path.read_text())
    # The token is worth nothing after one use, but it need not lie around either.
    path.write_text(json.dumps(dict(settings, token="")))
    main(settings)
