"""``gateway admin set-password``: the technician web page's admin password.

Reads the new password from standard input when that is not a terminal (one line), or prompts
twice; writes ``DATA_DIR/admin.json`` (0600, the scrypt hash only). A running hub checks the
next login against it at once, and every session opened with the old password ends at its next
request (log out everywhere).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from gateway.errors import GatewayError


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    admin = sub.add_parser("admin", help="the web page's admin account").add_subparsers(
        dest="admin_command", required=True)
    p = admin.add_parser("set-password", parents=[common],
                         help="set the admin password (stdin when not a terminal, else a prompt)")
    p.set_defaults(fn=cmd_set_password)


def read_new_password() -> str:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line:
            raise GatewayError("no password on standard input")
        return line.rstrip("\r\n")
    first = getpass.getpass("New admin password: ")
    if getpass.getpass("Again: ") != first:
        raise GatewayError("the two passwords differ; nothing changed")
    return first


def cmd_set_password(args: argparse.Namespace) -> int:
    from gateway.cli import _data_dir
    from gateway.store.files import private_directory
    from gateway.ui.security import write_admin

    data_dir = _data_dir(args)
    password = read_new_password()
    private_directory(data_dir)
    path = write_admin(data_dir, password)
    print(f"admin password set ({path})")
    return 0
