"""Your own CA: registered CA certificates with proof of possession (IoT Hub ref §8).

Pure values and checks; the registry stores them. The flow is IoT Hub's: upload a CA
certificate (no key) -> ask for a verification code -> sign a certificate whose ``CN`` is that
code with the CA's private key -> upload it -> the CA is verified. Only a *verified* CA vouches
for ``certificateAuthority`` devices: their leaf (``CN`` = device id) must chain to it, through
intermediates the device sends, by RFC 5280 path validation (:func:`verify_client_chain`).

REST shapes follow IoT Hub's certificate resource: ``{"name", "etag", "id", "type",
"properties": {"subject", "expiry", "thumbprint", "isVerified", "created", "updated",
"certificate"[, "verificationCode"]}}``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from gateway.errors import AuthError, InvalidRequestError, NotFoundError
from gateway.hubcerts import thumbprints

if TYPE_CHECKING:  # cryptography is imported where a certificate is read (idle footprint)
    from cryptography import x509

__all__ = [
    "CaCertificate",
    "certificate_not_found",
    "check_proof",
    "load_ca_pem",
    "new_verification_code",
    "validate_certificate_name",
    "verify_client_chain",
]

MAX_CHAIN_DEPTH: Final = 8  # leaf + intermediates + anchor
# IoT Hub certificate names: letters, digits, '-' and '_', up to 64.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True, slots=True)
class CaCertificate:
    """A CA certificate registered on the hub."""

    name: str
    pem: str
    etag: str
    is_verified: bool
    created: str
    updated: str
    verification_code: str | None = None

    @property
    def certificate(self) -> x509.Certificate:
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.pem.encode("ascii"))

    def to_json(self, *, with_code: bool = False) -> dict[str, Any]:
        """IoT Hub's certificate description (``with_code``: the verification-code answer)."""
        from email.utils import format_datetime  # email: 1 MB an idle hub does not need

        from cryptography.hazmat.primitives.serialization import Encoding

        cert = self.certificate
        properties: dict[str, Any] = {
            "subject": cert.subject.rfc4514_string(),
            "expiry": format_datetime(cert.not_valid_after_utc, usegmt=True),
            "thumbprint": thumbprints(cert.public_bytes(Encoding.DER))[0],
            "isVerified": self.is_verified,
            "created": self.created,
            "updated": self.updated,
            "certificate": self.pem,
        }
        if with_code:
            properties["verificationCode"] = self.verification_code
        return {"properties": properties, "id": f"/certificates/{self.name}",
                "name": self.name, "etag": self.etag,
                "type": "Microsoft.Devices/IotHubs/Certificates"}


def certificate_not_found(name: str) -> NotFoundError:
    """The 404 for a missing CA certificate, with IoT Hub's error code."""
    err = NotFoundError(f"certificate {name!r} not found")
    err.code = "CertificateNotFound"
    return err


def validate_certificate_name(name: str) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidRequestError(
            f"invalid certificate name {name!r}: 1-64 letters, digits, '-' or '_'")
    return name


def load_ca_pem(pem: object, *, now: datetime) -> str:
    """Check an uploaded CA certificate; return it alone, re-encoded as PEM. It must be a CA
    (basicConstraints CA:TRUE) and valid now: a leaf or an expired certificate would anchor
    nothing."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    if not isinstance(pem, str) or not pem.strip():
        raise InvalidRequestError("properties.certificate must be a PEM certificate")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidRequestError("properties.certificate is not a PEM certificate") from None
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise InvalidRequestError("the certificate is not a CA certificate "
                                  "(basicConstraints CA:TRUE is missing)")
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise InvalidRequestError("the CA certificate is not valid now (expired or not yet valid)")
    return cert.public_bytes(Encoding.PEM).decode("ascii")


def new_verification_code() -> str:
    """A fresh nonce for proof of possession (48 hex digits, like IoT Hub's)."""
    return secrets.token_hex(24).upper()


def check_proof(ca: CaCertificate, proof_pem: object, *, now: datetime) -> None:
    """Raise InvalidRequestError unless ``proof_pem`` is a certificate with ``CN`` = the CA's
    current verification code, signed by the CA's key, valid now."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import NameOID

    if ca.verification_code is None:
        raise InvalidRequestError(
            f"certificate {ca.name!r} has no verification code: generate one first")
    if not isinstance(proof_pem, str):
        raise InvalidRequestError("certificate must be a PEM certificate")
    try:
        proof = x509.load_pem_x509_certificate(proof_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise InvalidRequestError("certificate is not a PEM certificate") from None
    names = proof.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or names[0].value != ca.verification_code:
        raise InvalidRequestError("the verification certificate's CN is not the verification code")
    try:
        proof.verify_directly_issued_by(ca.certificate)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidRequestError(
            "the verification certificate is not signed by this CA's private key") from None
    if not proof.not_valid_before_utc <= now <= proof.not_valid_after_utc:
        raise InvalidRequestError("the verification certificate is not valid now")


def verify_client_chain(leaf: x509.Certificate, intermediates: Sequence[x509.Certificate],
                        anchors: Sequence[x509.Certificate], *, now: datetime) -> None:
    """RFC 5280 path validation of a device's certificate to one of ``anchors``, through the
    ``intermediates`` it sent (cryptography's verifier, web PKI rules: CA certificates must
    assert CA:TRUE, so a device's leaf can never issue for another). A device certificate
    needs no subjectAltName (IoT Hub identifies it by CN). Raises AuthError."""
    from cryptography import x509
    from cryptography.x509 import verification

    if not anchors:
        raise AuthError("no verified CA certificate to chain to")
    ee_policy = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
    verifier = (verification.PolicyBuilder()
                .store(verification.Store(list(anchors)))
                .time(now)
                .max_chain_depth(MAX_CHAIN_DEPTH)
                .extension_policies(ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ee_policy)
                .build_client_verifier())
    try:
        verifier.verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        raise AuthError(f"certificate chain not trusted: no path to the hub CA or a verified "
                        f"CA certificate through the {len(intermediates)} intermediate(s) the "
                        f"device sent ({exc})") from None
