"""The uv role's filter that picks uv's wheel from a package index page,
in both forms an index serves (PEP 503 HTML, PEP 691 JSON). The role itself
is exercised against the real index by Molecule and the cluster tests."""

from __future__ import annotations

import importlib.util
import json

import pytest
from ansible.errors import AnsibleFilterError

from conftest import ROOT

SHA_X86 = "a" * 64
SHA_ARM_OLD = "b" * 64
SHA_ARM_NEW = "c" * 64
X86 = "uv-0.13.9-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
ARM_OLD = "uv-0.13.9-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64.whl"
ARM_NEW = "uv-0.13.9-py3-none-manylinux_2_28_aarch64.whl"
HTML = f"""<!DOCTYPE html><html><body>
<a href="https://files.example/p/{ARM_NEW}#sha256={SHA_ARM_NEW}">{ARM_NEW}</a>
<a href="../../f/{X86}#sha256={SHA_X86}" data-requires-python="&gt;=3.8">{X86}</a>
<a href="https://files.example/p/{ARM_OLD}#sha256={SHA_ARM_OLD}">{ARM_OLD}</a>
<a href="https://files.example/p/uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl#sha256={'d' * 64}">uv-0.13.9-py3-none-musllinux_1_1_x86_64.whl</a>
<a href="https://files.example/p/uv-0.13.8-py3-none-manylinux_2_17_x86_64.whl#sha256={'e' * 64}">uv-0.13.8-py3-none-manylinux_2_17_x86_64.whl</a>
</body></html>"""
PAGE = "https://mirror.example/root/simple/uv/"


@pytest.fixture(scope="module")
def uv_wheel():
    path = ROOT / "plugins" / "filter" / "uv_wheel.py"
    spec = importlib.util.spec_from_file_location("uv_wheel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FilterModule().filters()["uv_wheel"]


def test_html_page_gives_the_wheel_for_the_architecture_with_an_absolute_url(uv_wheel):
    assert uv_wheel(HTML, PAGE, "0.13.9", "x86_64") == {
        "filename": X86, "url": f"https://mirror.example/root/f/{X86}", "sha256": SHA_X86}


def test_the_oldest_glibc_wins_when_several_wheels_fit(uv_wheel):
    assert uv_wheel(HTML, PAGE, "0.13.9", "aarch64")["sha256"] == SHA_ARM_OLD


def test_json_page(uv_wheel):
    page = json.dumps({"meta": {"api-version": "1.1"}, "files": [
        {"filename": X86, "url": f"../../f/{X86}", "hashes": {"sha256": SHA_X86}}]})
    assert uv_wheel(page, PAGE, "0.13.9", "x86_64")["url"] == f"https://mirror.example/root/f/{X86}"


@pytest.mark.parametrize("page, version, arch", [
    (HTML, "0.14.0", "x86_64"),                                  # version not there
    (HTML, "0.13.9", "riscv64"),                                 # architecture not there
    (HTML.replace(f"#sha256={SHA_X86}", ""), "0.13.9", "x86_64"),  # no checksum: never downloaded
    ("", "0.13.9", "x86_64"),
])
def test_no_usable_wheel_is_a_clear_error(uv_wheel, page, version, arch):
    with pytest.raises(AnsibleFilterError, match="uv_wheel"):
        uv_wheel(page, PAGE, version, arch)
