"""The management core: every operation the shell, the REST API and the web
admin center perform, with its validation, in one place."""

from __future__ import annotations

import importlib

CMDLET_MODULES = [
    "mailgate.manage.receive_connectors",
    "mailgate.manage.send_connectors",
    "mailgate.manage.domains_mailboxes",
    "mailgate.manage.transport",
    "mailgate.manage.credentials",
    "mailgate.manage.queues",
    "mailgate.manage.tracking",
    "mailgate.manage.testing",
    "mailgate.manage.certificates",
    "mailgate.manage.bestpractice",
]


def load_cmdlets(*, shell: bool = True) -> None:
    """Import every module that registers cmdlets (idempotent)."""
    for name in CMDLET_MODULES:
        importlib.import_module(name)
    if shell:
        importlib.import_module("mailgate.shell.builtins")
        importlib.import_module("mailgate.shell.sendmail")
        importlib.import_module("mailgate.shell.nettools")
