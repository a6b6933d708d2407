"""``gateway files``: files devices uploaded to this gateway (IoT Hub ref §11)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from gateway.errors import GatewayError


def _split(ref: str) -> tuple[str, str]:
    device, sep, name = ref.partition("/")
    if not sep or not device or not name:
        raise GatewayError(f"name a file as DEVICE/NAME, not {ref!r}")
    return device, name


def cmd_files(args: argparse.Namespace) -> int:
    from gateway.cli import _client, _print_json

    client = _client(args)
    what = args.files_command
    if what == "list":
        files = client.request("GET", "/files")
        if args.json:
            _print_json(files)
            return 0
        for f in files:
            state = f["state"]
            if state == "forwarding":
                state += f" {f['upstream']['progress']:.0%}"
            print(f"{f['blobName']:<48} {state:<15} {f['size']:>12} bytes  {f['updated']}")
        return 0
    device, name = _split(args.file)
    path = f"/files/{device}/{name}"
    if what == "show":
        _print_json(client.request("GET", path))
    elif what == "delete":
        client.request("DELETE", path)
    elif what == "download":
        tmp = args.out + ".part"
        with open(tmp, "wb") as out:
            n = client.download(path, out, query={"download": "true"})
        os.replace(tmp, args.out)
        print(json.dumps({"file": args.file, "bytes": n, "out": args.out}))
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    files = sub.add_parser("files", help="files uploaded by devices").add_subparsers(
        dest="files_command", required=True, metavar="COMMAND")
    p = files.add_parser("list", parents=[common], help="list uploads and their state")
    p.add_argument("--json", action="store_true")
    for name, help_ in (("show", "print one file's state"), ("delete", "delete a file")):
        files.add_parser(name, parents=[common], help=help_).add_argument("file",
                                                                          metavar="DEVICE/NAME")
    p = files.add_parser("download", parents=[common], help="copy a stored file here")
    p.add_argument("file", metavar="DEVICE/NAME")
    p.add_argument("--out", required=True, help="the file to write")
    for parser in files.choices.values():
        parser.set_defaults(fn=cmd_files)
