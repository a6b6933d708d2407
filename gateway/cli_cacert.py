"""``gateway ca-cert``: your own CA, with proof of possession (IoT Hub ref §8).

Like ``az iot hub certificate``: upload a CA certificate, get a verification code, sign a
certificate with ``CN`` = the code using the CA's key, upload it; the CA is then verified and
``certificateAuthority`` devices whose certificate chains to it may connect. ``--verified``
marks it verified at upload (the owner vouches for the key instead of proving it).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError

__all__ = ["add_parser"]


def _pem(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except OSError as exc:
        raise GatewayError(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise GatewayError(f"{what} {path} is not a PEM file") from None


def cmd_ca_cert(args: argparse.Namespace, client: Any, print_json: Callable[[Any], None]) -> int:
    path = f"/certificates/{args.name}" if getattr(args, "name", None) else "/certificates"
    if args.action == "create":
        body = {"properties": {"certificate": _pem(args.path, "CA certificate"),
                               "isVerified": bool(args.verified)}}
        print_json(client.request("PUT", path, body))
    elif args.action == "list":
        for cert in client.request("GET", "/certificates")["value"]:
            props = cert["properties"]
            print(f"{cert['name']}\t{'verified' if props['isVerified'] else 'unverified'}\t"
                  f"{props['subject']}\t{props['expiry']}")
    elif args.action == "show":
        print_json(client.request("GET", path))
    elif args.action == "delete":
        client.request("DELETE", path, headers={"If-Match": "*"})
    elif args.action == "verification-code":
        answer = client.request("POST", path + "/generateVerificationCode",
                                headers={"If-Match": "*"})
        print(answer["properties"]["verificationCode"])
    elif args.action == "verify":
        proof = {"certificate": _pem(args.path, "verification certificate")}
        print_json(client.request("POST", path + "/verify", proof, headers={"If-Match": "*"}))
    return 0


def add_parser(sub: Any, common: argparse.ArgumentParser,
               run: Callable[[argparse.Namespace], int]) -> None:
    """Add ``ca-cert`` to the ``gateway`` subcommands; ``run(args)`` is called for each."""
    cacert = sub.add_parser("ca-cert", help="your own CA certificates (proof of possession)"
                            ).add_subparsers(dest="action", required=True, metavar="ACTION")
    p = cacert.add_parser("create", parents=[common], help="upload a CA certificate")
    p.add_argument("name", help="a name for it (letters, digits, - and _)")
    p.add_argument("--path", required=True, metavar="PEM", help="the CA certificate (no key)")
    p.add_argument("--verified", action="store_true",
                   help="mark it verified now, without proof of possession")
    cacert.add_parser("list", parents=[common], help="list CA certificates")
    for name, help_ in (("show", "print a CA certificate's description"),
                        ("delete", "delete a CA certificate"),
                        ("verification-code", "print a new proof-of-possession code")):
        cacert.add_parser(name, parents=[common], help=help_).add_argument("name")
    p = cacert.add_parser("verify", parents=[common],
                          help="prove possession: a certificate with CN = the code, "
                               "signed by the CA's key")
    p.add_argument("name")
    p.add_argument("--path", required=True, metavar="PEM")
    for p in cacert.choices.values():
        p.set_defaults(fn=run)
