"""The project's filters and tests (plugins/): facts written once."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from conftest import ROOT


def load(path: str):
    spec = importlib.util.spec_from_file_location(path.replace("/", "_").removesuffix(".py"), ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cluster = load("plugins/filter/cluster.py")
settings = load("plugins/test/dask_settings.py")
dask_tls = load("plugins/filter/dask_tls.py")


def test_machine_names():
    assert cluster.dask_scheduler_name("lab") == "dask-lab-scheduler"
    assert cluster.dask_worker_names("lab", "3") == ["dask-lab-worker-1", "dask-lab-worker-2", "dask-lab-worker-3"]
    assert cluster.dask_worker_names("lab", 0) == []


@pytest.mark.parametrize(("url", "name"), [
    ("https://github.com/me/analysis.git", "analysis"),
    ("https://github.com/me/analysis/", "analysis"),
    ("git@github.com:me/geo-course.git", "geo-course"),
    ("git://10.0.0.1:9418/citest-analysis.git", "citest-analysis"),
    ("file:///srv/git/notes", "notes"),
])
def test_git_project_name_is_what_git_clone_makes(url, name):
    assert cluster.git_project_name(url) == name


def test_uv_environment():
    env = cluster.uv_environment("/var/cache/uv", "/etc/ssl/certs/ca-certificates.crt")
    assert env == {"UV_CACHE_DIR": "/var/cache/uv", "UV_PYTHON_DOWNLOADS": "never", "UV_SYSTEM_CERTS": "1",
                   "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    env = cluster.uv_environment("/c", "/ca", "https://mirror.example/simple", False)
    assert env["UV_INDEX_URL"] == "https://mirror.example/simple" and env["UV_COMPILE_BYTECODE"] == "0"


def test_tls_certificate_of_a_machine_names_both_its_addresses_once_and_localhost():
    host = {"inventory_hostname": "w1", "ansible_host": "54.1.2.3", "ansible_facts": {"default_ipv4": {"address": "10.0.0.5"}}}
    assert cluster.dask_tls_certificate(host) == {"name": "w1",
                                                  "addresses": ["54.1.2.3", "10.0.0.5", "localhost", "127.0.0.1"]}
    host["ansible_host"] = "10.0.0.5"
    assert cluster.dask_tls_certificate(host)["addresses"] == ["10.0.0.5", "localhost", "127.0.0.1"]
    # A second certificate of the machine (Jupyter's, a key of its own) names the machine too.
    assert cluster.dask_tls_certificate(host, "-jupyter") == {"name": "w1-jupyter",
                                                              "addresses": ["w1", "10.0.0.5", "localhost", "127.0.0.1"]}


@pytest.mark.parametrize(("value", "ok"), [("", True), ("30m", True), ("1.5h", True), ("90s", True), ("2d", True),
                                           ("30", False), ("m", False), ("30 m", False), ("1w", False)])
def test_duration(value, ok):
    assert settings.dask_duration(value) is ok


@pytest.mark.parametrize(("value", "ok"), [("auto", True), (0, True), ("0.8", True), (".5", True), ("1", True),
                                           ("4GiB", True), ("2500MB", True), ("lots", False), ("4 GiBs", False),
                                           ("-1", False)])
def test_memory_limit(value, ok):
    assert settings.dask_memory_limit(value) is ok


def test_tls_pending_and_manifest(tmp_path):
    now = int(time.time())
    certs = [{"name": "a", "addresses": ["10.0.0.2", "10.0.0.1"]}, {"name": "b", "addresses": []}]
    for name in ("a", "b"):
        (tmp_path / f"{name}.pem").write_text("x")
        (tmp_path / f"{name}.key").write_text("x")
    manifest = dask_tls.dask_tls_manifest({}, certs, 365, now, "CA")
    assert manifest["a"] == {"addresses": ["10.0.0.1", "10.0.0.2"], "renew_after": now + 335 * 86400}
    assert manifest["_ca"] == {"common_name": "CA"}
    # Nothing to do on an unchanged cluster...
    assert dask_tls.dask_tls_pending(certs, manifest, str(tmp_path), False, 365, now) == []
    # ... but a new address, a missing key, a new CA, a passed renewal date or no validity in days re-issue.
    moved = [{"name": "a", "addresses": ["10.0.0.9"]}, certs[1]]
    assert [c["name"] for c in dask_tls.dask_tls_pending(moved, manifest, str(tmp_path), False, 365, now)] == ["a"]
    (tmp_path / "b.key").unlink()
    assert [c["name"] for c in dask_tls.dask_tls_pending(certs, manifest, str(tmp_path), False, 365, now)] == ["b"]
    assert len(dask_tls.dask_tls_pending(certs, manifest, str(tmp_path), True, 365, now)) == 2
    assert len(dask_tls.dask_tls_pending(certs, manifest, str(tmp_path), False, 0, now)) == 2
    later = now + 336 * 86400
    assert len(dask_tls.dask_tls_pending(certs, manifest, str(tmp_path), False, 365, later)) == 2


@pytest.mark.parametrize(("path", "expected"), [
    ("results", "results"), ("results/", "results"), ("./a/b/../c", "a/c"), (".", "."), ("", "."),
    ("/var/lib/dask/notebooks/x.ipynb", "x.ipynb"), ("/var/lib/dask/notebooks", "."),
    ("..", ""), ("../other", ""), ("a/../../x", ""), ("/etc/passwd", ""), ("/var/lib/dask/notebooks-2/x", ""),
])
def test_notebook_relpath_keeps_paths_inside_the_notebook_directory(path, expected):
    assert cluster.notebook_relpath(path, "/var/lib/dask/notebooks/") == expected


def test_local_path_is_absolute_without_trailing_slash_or_symlink_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert cluster.local_path("link/") == str(tmp_path / "link")
    assert cluster.local_path("./real/../real") == str(tmp_path / "real")
    assert cluster.local_path("~") == os.path.expanduser("~")


@pytest.mark.parametrize(("entry", "bucket", "prefix", "error"), [
    ("my-lab-data", "my-lab-data", "", ""),
    ("s3://my-lab-data/rasters/2026/", "my-lab-data", "rasters/2026", ""),
    ("sentinel-cogs/sentinel-s2-l2a-cogs", "sentinel-cogs", "sentinel-s2-l2a-cogs", ""),
    ("My_Bucket", "My_Bucket", "", "does not start with a bucket name"),
    ("ab", "ab", "", "does not start with a bucket name"),
    ("a..b", "a..b", "", "does not start with a bucket name"),
    ("data/tiles/*.tif", "data", "tiles/*.tif", "has a wildcard"),
])
def test_s3_locations_split_and_check_each_entry(entry, bucket, prefix, error):
    (found,) = cluster.s3_locations([entry])
    assert (found["bucket"], found["prefix"]) == (bucket, prefix)
    assert error in found["error"] if error else found["error"] == ""


def test_s3_access_policy_allows_exactly_the_buckets_asked_for():
    policy = cluster.s3_access_policy(["data-a/raw", "data-a/more", "public-b"], ["results-c"])
    assert policy["Statement"] == [
        {"Sid": "List1", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::data-a",
         "Condition": {"StringLike": {"s3:prefix": ["more", "more/*", "raw", "raw/*"]}}},
        {"Sid": "List2", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::public-b"},
        {"Sid": "List3", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": "arn:aws:s3:::results-c"},
        {"Sid": "Read", "Effect": "Allow", "Action": "s3:GetObject",
         "Resource": ["arn:aws:s3:::data-a/more/*", "arn:aws:s3:::data-a/raw/*", "arn:aws:s3:::public-b/*"]},
        {"Sid": "Write", "Effect": "Allow",
         "Action": ["s3:AbortMultipartUpload", "s3:DeleteObject", "s3:GetObject", "s3:PutObject"],
         "Resource": ["arn:aws:s3:::results-c/*"]},
    ]
    # A whole bucket wanted beside a prefix of it: listing is not limited.
    assert "Condition" not in cluster.s3_access_policy(["data-a/raw"], ["data-a"])["Statement"][0]
    assert [s["Sid"] for s in cluster.s3_access_policy([], ["results-c"])["Statement"]] == ["List1", "Write"]


def test_other_owners_names_what_carries_another_callers_owner_tag():
    me, alice = "arn:aws:iam::1:user/me", "arn:aws:iam::1:user/alice"
    owner = "dask-ec2-ansible:owner"
    found = {"instance": [{"instance_id": "i-1", "tags": {"Name": "dask-lab-scheduler", owner: alice}},
                          {"instance_id": "i-2", "tags": {owner: me}}],
             "security group": [{"group_name": "dask-lab", "tags": {}}],
             "key pair": [{"key_name": "dask-lab", "tags": {owner: alice}}],
             "role": []}
    assert cluster.other_owners(found, me) == [{"what": "instance dask-lab-scheduler", "owner": alice},
                                               {"what": "key pair dask-lab", "owner": alice}]
    # No owner tag (made before the tag existed): the caller's.
    assert cluster.other_owners({"security group": [{"group_name": "dask-lab"}], "role": None}, me) == []


@pytest.mark.parametrize(("url", "shown"), [
    ("https://me:s3cret@mirror.example/simple", "https://me:****@mirror.example/simple"),
    ("https://s3cret@pypi.fury.io/lab/", "https://****@pypi.fury.io/lab/"),
    ("https://mirror.example/simple/a@b", "https://mirror.example/simple/a@b"),
    ("file:///srv/wheels", "file:///srv/wheels"),
    ("", ""),
])
def test_redact_url_hides_the_secret_of_an_index_url(url, shown):
    assert cluster.redact_url(url) == shown
