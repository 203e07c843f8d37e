# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Pick uv's wheel for a machine from a package index's project page.

The page is the index's "simple" page of the project uv, in either form an
index may serve: PEP 691 JSON or PEP 503 HTML (PyPI serves both; many
mirrors only HTML). Both give each file's URL and its sha256, so the wheel
can be downloaded on the machine and checked before it is unpacked.
"""

from __future__ import annotations

DOCUMENTATION = r"""
name: uv_wheel
short_description: The uv wheel for a machine, from a package index's page of uv
version_added: 0.1.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Reads the index's "simple" page of the project uv, in either form an index
    may serve (PEP 691 JSON or PEP 503 HTML), and gives the manylinux wheel of
    the wanted uv version for the machine's architecture, with its URL and its
    sha256, so the machine downloads and checks it before unpacking it.
  - When several wheels fit, the one that needs the oldest glibc.
positional: page_url, version, architecture
options:
  _input:
    description: The page, as the index served it.
    type: str
    required: true
  page_url:
    description: The page's URL (relative file URLs are resolved against it).
    type: str
    required: true
  version:
    description: The uv version.
    type: str
    required: true
  architecture:
    description: The machine's architecture, as C(ansible_facts['architecture']) says it (x86_64, aarch64).
    type: str
    required: true
"""

EXAMPLES = r"""
- name: Read uv's page on PyPI
  ansible.builtin.uri:
    url: https://pypi.org/simple/uv/
    return_content: true
  register: page

- name: Pick the wheel for this machine
  ansible.builtin.set_fact:
    wheel: "{{ page.content | dask_ec2_ansible.cluster.uv_wheel('https://pypi.org/simple/uv/', '0.13.9', ansible_facts['architecture']) }}"
"""

RETURN = r"""
_value:
  description: The wheel - C(filename), C(url) and C(sha256).
  type: dict
"""

import html
import json
import re
from urllib.parse import urldefrag, urljoin

from ansible.errors import AnsibleFilterError

# <a href="URL#sha256=HASH" ...>FILENAME</a>, as PEP 503 describes it.
_ANCHOR = re.compile(r"<a\s[^>]*?href=\"([^\"]+)\"[^>]*>\s*([^<]+?)\s*</a>", re.IGNORECASE)


def _files(page: str, page_url: str) -> list[dict]:
    """Every file of the page as {filename, url, sha256} (sha256 may be None)."""
    text = page.lstrip()
    if text.startswith("{"):
        files = []
        for entry in json.loads(text).get("files", []):
            files.append({"filename": entry["filename"], "url": urljoin(page_url, entry["url"]),
                          "sha256": entry.get("hashes", {}).get("sha256")})
        return files
    files = []
    for href, name in _ANCHOR.findall(text):
        url, fragment = urldefrag(urljoin(page_url, html.unescape(href)))
        algorithm, digest = fragment.partition("=")[::2]
        files.append({"filename": html.unescape(name), "url": url,
                      "sha256": digest.lower() if algorithm == "sha256" else None})
    return files


def uv_wheel(page: str, page_url: str, version: str, architecture: str) -> dict:
    """The manylinux wheel of uv `version` for `architecture` (x86_64,
    aarch64...) with its sha256; the one that needs the oldest glibc when
    several fit."""
    if not isinstance(page, str) or not page.strip():
        raise AnsibleFilterError(f"uv_wheel: the package index answered nothing at {page_url}")
    try:
        files = _files(page, page_url)
    except (ValueError, KeyError, TypeError) as exc:
        raise AnsibleFilterError(f"uv_wheel: cannot read the package index page {page_url}: {exc}") from exc
    pattern = re.compile(
        rf"^uv-{re.escape(version)}-py3-none-(?:[^-]*\.)?manylinux_(\d+)_(\d+)_{re.escape(architecture)}(?:\.[^-]*)?\.whl$"
    )
    candidates = []
    for entry in files:
        match = pattern.match(entry["filename"])
        if match and entry["sha256"]:
            candidates.append(((int(match.group(1)), int(match.group(2))), entry))
    if not candidates:
        raise AnsibleFilterError(
            f"uv_wheel: {page_url} lists no manylinux wheel of uv {version} for {architecture} "
            f"with a sha256 (is uv_version right, and does the index carry uv?)"
        )
    return min(candidates, key=lambda candidate: candidate[0])[1]


class FilterModule:
    def filters(self):
        return {"uv_wheel": uv_wheel}
