#!/usr/bin/python
# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Make a tree that came back from a cluster unable to configure anything on this machine."""

from __future__ import annotations

DOCUMENTATION = r"""
module: dask_ec2_inert
short_description: Make files that came back from a cluster inert (no git configuration or hooks, no links out)
version_added: 0.2.0
author:
  - dask-ec2-ansible contributors (!UNKNOWN)
description:
  - Code on a cluster runs as the Jupyter user and can write anything into the notebook directory, which
    teardown (save_work) and C(sync.yml -e down=...) copy to the controller. This module, run on the
    controller on what was copied, takes away what would act there without being opened.
  - In every git directory (a C(.git) directory, or any directory git would take for one, such as a bare
    repository), C(config) and C(config.worktree) are renamed to C(*.from-cluster) and a C(config) with
    only the repository format (and the object format and ref storage, which reading the repository
    needs) takes their place; C(hooks) is renamed to C(hooks.from-cluster). Git then runs nothing the
    cluster wrote (C(core.fsmonitor), C(core.hooksPath), hooks, filters, aliases), and every object,
    ref and the index are kept.
  - A C(.git) file (a submodule's or worktree's link) that points outside O(path) is renamed to
    C(.git.from-cluster).
  - A symbolic link whose target resolves outside O(path) is removed.
  - What was changed is listed in C(<path>/.dask-ec2-ansible-inert.txt) (with each removed link's
    target), so that nothing is lost without a trace.
  - Walks without following links. Honours check mode (reports what it would change, changes nothing).
options:
  path:
    description: The directory to make inert.
    type: path
    required: true
"""

EXAMPLES = r"""
- name: Make the saved notebook directory inert
  dask_ec2_ansible.cluster.dask_ec2_inert:
    path: saved/lab/2026-12-03T101500Z
  delegate_to: localhost
"""

RETURN = r"""
changes:
  description: What was changed, one line each (paths relative to O(path)).
  type: list
  elements: str
  returned: always
"""

import os
import re
import shutil

from ansible.module_utils.basic import AnsibleModule

NOTE = ".dask-ec2-ansible-inert.txt"
SUFFIX = ".from-cluster"
# What reading the repository needs from its configuration; nothing in these runs code.
KEPT = (("core", "repositoryformatversion"), ("extensions", "objectformat"), ("extensions", "refstorage"))


def _is_git_dir(path, names):
    """As git's is_git_directory: HEAD, and objects and refs (here or through commondir)."""
    if "HEAD" not in names or not os.path.isfile(os.path.join(path, "HEAD")):
        return False
    if os.path.basename(path) == ".git":
        return True
    return all(os.path.isdir(os.path.join(path, d)) for d in ("objects", "refs")) or "commondir" in names


def _kept_config(text):
    """The KEPT settings of a git config file, as a config file of their own."""
    section, found = None, {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        header = re.fullmatch(r"\[\s*([A-Za-z0-9.-]+)\s*\]", line)
        if header:
            section = header[1].lower()
            continue
        setting = re.fullmatch(r"([A-Za-z][A-Za-z0-9-]*)\s*=\s*([A-Za-z0-9-]+)", line)
        if section and setting and (section, setting[1].lower()) in KEPT:
            found.setdefault(section, {})[setting[1].lower()] = setting[2]
    found.setdefault("core", {}).setdefault("repositoryformatversion", "0")
    return "".join(f"[{section}]\n" + "".join(f"\t{key} = {value}\n" for key, value in settings.items())
                   for section, settings in sorted(found.items()))


def _inside(root, target):
    return target == root or target.startswith(root + os.sep)


def plan(root):
    """[(action, relative path, detail)] for the tree at root."""
    root = os.path.realpath(root)
    actions = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                target = os.path.realpath(full)
                if not _inside(root, target):
                    actions.append(("unlink", os.path.normpath(os.path.join(rel, name)), os.readlink(full)))
            elif name == ".git" and os.path.isfile(full):
                with open(full, encoding="utf-8", errors="replace") as link:
                    pointed = link.read().strip()
                gitdir = pointed[len("gitdir:"):].strip() if pointed.startswith("gitdir:") else ""
                if not gitdir or not _inside(root, os.path.realpath(os.path.join(dirpath, gitdir))):
                    actions.append(("rename", os.path.normpath(os.path.join(rel, name)), ""))
        # Links to directories are not walked into (os.walk does not follow them).
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        if _is_git_dir(dirpath, dirnames + filenames):
            for name in ("config", "config.worktree"):
                full = os.path.join(dirpath, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    with open(full, encoding="utf-8", errors="replace") as config:
                        text = config.read()
                    kept = _kept_config(text) if name == "config" else None
                    if text != kept:
                        actions.append(("config", os.path.normpath(os.path.join(rel, name)), kept))
            hooks = os.path.join(dirpath, "hooks")
            if os.path.isdir(hooks) and not os.path.islink(hooks):
                actions.append(("rename", os.path.normpath(os.path.join(rel, "hooks")), ""))
                dirnames[:] = [d for d in dirnames if d != "hooks"]
    return root, actions


def _set_aside(full):
    """full -> full.from-cluster, over what an earlier copy set aside there."""
    aside = full + SUFFIX
    if os.path.isdir(aside) and not os.path.islink(aside):
        shutil.rmtree(aside)
    os.replace(full, aside)


def apply(root, actions):
    lines = []
    # Deepest first, so that a rename never moves a path a later action names.
    for action, rel, detail in sorted(actions, key=lambda a: a[1].count(os.sep), reverse=True):
        full = os.path.join(root, rel)
        if action == "unlink":
            os.unlink(full)
            lines.append(f"removed the link {rel} -> {detail} (it points outside)")
        elif action == "rename":
            _set_aside(full)
            lines.append(f"renamed {rel} to {rel}{SUFFIX}")
        else:
            _set_aside(full)
            if detail is not None:
                with open(full, "x", encoding="utf-8") as config:
                    config.write(detail)
            lines.append(f"renamed {rel} to {rel}{SUFFIX}" + (", put a plain one in its place" if detail else ""))
    return lines


def main():
    module = AnsibleModule(argument_spec={"path": {"type": "path", "required": True}}, supports_check_mode=True)
    path = module.params["path"]
    if not os.path.isdir(path):
        module.fail_json(msg=f"{path} is not a directory")
    root, actions = plan(path)
    if module.check_mode or not actions:
        module.exit_json(changed=bool(actions), changes=[f"{action[0]} {action[1]}" for action in actions])
    lines = apply(root, actions)
    # Not through a link of the same name (O_NOFOLLOW).
    descriptor = os.open(os.path.join(root, NOTE), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "a", encoding="utf-8") as note:
        note.write("What came back from the cluster and was made inert here (dask_ec2_inert):\n")
        note.writelines(f"  {line}\n" for line in lines)
    module.exit_json(changed=True, changes=lines)


if __name__ == "__main__":
    main()
