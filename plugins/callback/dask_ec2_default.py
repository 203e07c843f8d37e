# Copyright: dask-ec2-ansible contributors
# BSD-3-Clause
"""Ansible's default screen output, except that a text meant for people is
printed as it is: not quoted, escaped, folded or indented as a YAML or JSON
value, so that what a user copies from the terminal (a line of Python that
connects to the cluster, a command) works when pasted."""

from __future__ import annotations

DOCUMENTATION = """
    name: dask_ec2_default
    type: stdout
    short_description: default Ansible screen output, with texts for people shown as they are
    version_added: 0.1.0
    author:
      - dask-ec2-ansible contributors (!UNKNOWN)
    description:
      - >-
        The default callback (ansible.builtin.default) with one difference. The result of a
        debug task whose task variable C(show_as_text) is true, and whose msg is a string, is
        printed as that string, line by line, with nothing added (no "ok: [host] =>", no quotes,
        no escaped quotes, no indentation).
      - Every other result, and that one with -v, is printed by the default callback.
    extends_documentation_fragment:
      - default_callback
      - result_format_callback
    requirements:
      - set as stdout_callback in ansible.cfg
"""

EXAMPLES = r"""
# ansible.cfg
# [defaults]
# stdout_callback = dask_ec2_ansible.cluster.dask_ec2_default

- name: Print the lines to paste into Python as they are (no quotes, no escaping)
  ansible.builtin.debug:
    msg: |-
      from dask.distributed import Client
      client = Client("tls://10.0.0.5:8786")
  vars:
    show_as_text: true
"""

from ansible.plugins.callback.default import CallbackModule as DefaultCallbackModule
from ansible.utils.fqcn import add_internal_fqcns

DEBUG_ACTIONS = frozenset(add_internal_fqcns(("debug",)))


class CallbackModule(DefaultCallbackModule):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "dask_ec2_default"

    def v2_runner_on_ok(self, result) -> None:
        text = self._text_for_people(result)
        if text is None:
            super().v2_runner_on_ok(result)
            return
        if self._last_task_banner != result.task._uuid:
            self._print_task_banner(result.task)
        self._handle_warnings_and_exception(result)
        self._display.display(text)

    def _text_for_people(self, result) -> str | None:
        """The msg to print as it is, or None for the default output."""
        task = result.task
        # (debug results are always "verbose": -v is what asks for the default dump.)
        if task.action not in DEBUG_ACTIONS or task.loop or self._display.verbosity > 0:
            return None
        if (task.vars or {}).get("show_as_text") is not True:
            return None
        text = result.result.get("msg")
        return str(text) if isinstance(text, str) else None
