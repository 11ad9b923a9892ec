"""The local CA and the mesh identities (SPIFFE X.509 SVIDs) issued from it.

Layout under a certs dir (every dir 0700, every key 0600 from the moment it exists):

    ca.crt, ca.key                       the CA (EC P-256, about 10 years)
    <name>/cert.pem -> .current/cert.pem  the leaf of identity <name>
    <name>/key.pem  -> .current/key.pem   and its key
    <name>/.current -> .pair-<n>          the live pair; a rotation writes a new .pair-<n>
                                          and renames a new .current over the old one, so
                                          the cert and key switch together in one rename

Envoy watches each identity dir (file-based SDS with ``watched_directory``) and reloads on
that rename; Python servers use `dynamic_server_credentials`, which reloads the same way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "servemesh.local"
DEFAULT_NAMESPACE = "default"
DEFAULT_IDENTITIES = ("edge", "gateway", "inference", "registry", "control-plane", "console", "cli")

CA_VALIDITY = dt.timedelta(days=3650)
CA_RENEW_WITHIN = dt.timedelta(days=90)
LEAF_VALIDITY = dt.timedelta(days=30)
LEAF_RENEW_WITHIN = dt.timedelta(days=10)
_CLOCK_SKEW = dt.timedelta(minutes=5)

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_CURRENT = ".current"
_PAIR_PREFIX = ".pair-"


class CertError(Exception):
    """A certs dir that cannot be used as asked (bad name, missing CA, unreadable files)."""


def spiffe_id(name: str, namespace: str = DEFAULT_NAMESPACE) -> str:
    """SPIFFE id of a mesh identity: spiffe://servemesh.local/ns/<namespace>/sa/<name>."""
    _check_name(name, "identity name")
    _check_name(namespace, "namespace")
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{name}"


@dataclass(frozen=True)
class Identity:
    """One mesh identity and where its files are."""

    name: str
    spiffe_id: str
    cert_path: Path
    key_path: Path
    ca_path: Path

    @property
    def dir(self) -> Path:
        return self.cert_path.parent

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())


def identity(certs_dir: Path, name: str, namespace: str = DEFAULT_NAMESPACE) -> Identity:
    """The Identity for `name` in `certs_dir` (paths only; nothing is read or written)."""
    certs_dir = Path(certs_dir)
    return Identity(
        name=name,
        spiffe_id=spiffe_id(name, namespace),
        cert_path=certs_dir / name / "cert.pem",
        key_path=certs_dir / name / "key.pem",
        ca_path=certs_dir / "ca.crt",
    )


def ensure_identities(
    certs_dir: Path,
    names: Iterable[str] = DEFAULT_IDENTITIES,
    namespace: str = DEFAULT_NAMESPACE,
    *,
    leaf_validity: dt.timedelta = LEAF_VALIDITY,
    renew_within: dt.timedelta = LEAF_RENEW_WITHIN,
) -> dict[str, Identity]:
    """Create the CA and a leaf per name if missing; keep valid ones.

    A leaf is reissued when it is missing, unreadable, expires within `renew_within`,
    was not issued by the current CA, does not match its key, or names another SPIFFE id.
    A CA that is missing, unreadable or expires within 90 days is replaced, and then every
    leaf in the dir is reissued (named or not), since their issuer changed.
    """
    certs_dir = Path(certs_dir)
    names = list(dict.fromkeys(names))
    for name in names:
        _check_name(name, "identity name")
    _check_name(namespace, "namespace")
    with _locked(certs_dir):
        ca_cert, ca_key, new_ca = _ensure_ca(certs_dir)
        if new_ca:
            _reissue_others(certs_dir, set(names), ca_cert, ca_key, leaf_validity)
        out: dict[str, Identity] = {}
        for name in names:
            ident = identity(certs_dir, name, namespace)
            if _leaf_problem(ident, ca_cert, renew_within) is not None:
                _issue_leaf(ident, ca_cert, ca_key, leaf_validity)
            out[name] = ident
        return out


def rotate(
    certs_dir: Path,
    names: Iterable[str] | None = None,
    *,
    leaf_validity: dt.timedelta = LEAF_VALIDITY,
) -> dict[str, Identity]:
    """Issue a new key and certificate for each leaf (default: every existing identity).

    Each identity keeps the namespace of its current certificate ("default" if it has
    none yet). The new pair becomes visible in one atomic rename. If the CA had to be
    replaced, every other leaf is reissued too.
    """
    certs_dir = Path(certs_dir)
    with _locked(certs_dir):
        ca_cert, ca_key, new_ca = _ensure_ca(certs_dir)
        chosen = list(dict.fromkeys(names)) if names is not None else existing_identities(certs_dir)
        if new_ca:
            _reissue_others(certs_dir, set(chosen), ca_cert, ca_key, leaf_validity)
        out: dict[str, Identity] = {}
        for name in chosen:
            _check_name(name, "identity name")
            ident = identity(certs_dir, name, _current_namespace(certs_dir, name))
            _issue_leaf(ident, ca_cert, ca_key, leaf_validity)
            out[name] = ident
        return out


def existing_identities(certs_dir: Path) -> list[str]:
    """Names of the identities that have a leaf in `certs_dir`, sorted."""
    certs_dir = Path(certs_dir)
    if not certs_dir.is_dir():
        return []
    return sorted(p.name for p in certs_dir.iterdir() if _NAME.match(p.name) and (p / "cert.pem").exists())


def read_pair(ident: Identity) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) of one consistent generation of the leaf."""
    for _ in range(20):
        target = _current_target(ident.dir)
        base = ident.dir / target if target else ident.dir
        try:
            cert, key = (base / "cert.pem").read_bytes(), (base / "key.pem").read_bytes()
        except FileNotFoundError:
            if target is None or _current_target(ident.dir) == target:
                raise
            continue  # a rotation switched generations between the two reads
        if target is not None or _pair_matches(cert, key):
            return cert, key
        time.sleep(0.01)
    raise CertError(f"cannot read a consistent certificate/key pair for {ident.name} in {ident.dir}")


def channel_credentials(ident: Identity) -> grpc.ChannelCredentials:
    """mTLS client credentials: present this identity, trust the mesh CA."""
    cert, key = read_pair(ident)
    return grpc.ssl_channel_credentials(
        root_certificates=ident.ca_path.read_bytes(), private_key=key, certificate_chain=cert
    )


def server_credentials(ident: Identity, require_client_auth: bool = True) -> grpc.ServerCredentials:
    """TLS server credentials read once; clients must present a mesh certificate by default."""
    cert, key = read_pair(ident)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ident.ca_path.read_bytes(), require_client_auth=require_client_auth
    )


def dynamic_server_credentials(ident: Identity, require_client_auth: bool = True) -> grpc.ServerCredentials:
    """Like `server_credentials`, but new handshakes pick up a rotated leaf or a replaced CA."""
    lock = threading.Lock()
    state = {"version": _version(ident)}

    def config() -> grpc.ServerCertificateConfiguration:
        cert, key = read_pair(ident)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ident.ca_path.read_bytes())

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        with lock:
            version = _version(ident)
            if version == state["version"]:
                return None
            try:
                fresh = config()
            except (OSError, CertError):
                return None  # keep serving the last good pair; try again on the next handshake
            state["version"] = version
            return fresh

    return grpc.dynamic_ssl_server_credentials(config(), fetch, require_client_authentication=require_client_auth)


def describe(idents: Sequence[Identity]) -> list[dict[str, object]]:
    """One row per identity (name, SPIFFE id, serial, not_after) for tables and logs."""
    rows = []
    for ident in idents:
        cert = ident.certificate()
        rows.append(
            {
                "name": ident.name,
                "spiffe_id": ident.spiffe_id,
                "serial": f"{cert.serial_number:x}",
                "not_after": cert.not_valid_after_utc,
            }
        )
    return rows


# --- internals -----------------------------------------------------------------------------


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _NAME.match(value):
        raise CertError(f"invalid {what} {value!r}: use lowercase letters, digits and '-' (a DNS label)")


@contextlib.contextmanager
def _locked(certs_dir: Path) -> Iterator[None]:
    _mkdir_private(certs_dir)
    fd = os.open(certs_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _mkdir_private(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a temp file created with `mode` (so a key is never readable by others), fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _symlink_atomic(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ensure_ca(certs_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    """The CA (cert, key, created now?): kept if valid for more than 90 days, else replaced."""
    crt, key_file = certs_dir / "ca.crt", certs_dir / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(crt.read_bytes())
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if (
            isinstance(key, ec.EllipticCurvePrivateKey)
            and key.public_key() == cert.public_key()
            and cert.not_valid_after_utc - _now() > CA_RENEW_WITHIN
        ):
            os.chmod(key_file, 0o600)
            return cert, key, False
    except (OSError, ValueError):
        pass
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "servemesh"),
            x509.NameAttribute(NameOID.COMMON_NAME, "servemesh local CA"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{TRUST_DOMAIN}")]), False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(key_file, _key_pem(key), 0o600)
    write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key, True


def _reissue_others(
    certs_dir: Path,
    skip: set[str],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    validity: dt.timedelta,
) -> None:
    for name in existing_identities(certs_dir):
        if name not in skip:
            _issue_leaf(identity(certs_dir, name, _current_namespace(certs_dir, name)), ca, ca_key, validity)


def _leaf_problem(ident: Identity, ca: x509.Certificate, renew_within: dt.timedelta) -> str | None:
    try:
        cert_pem, key_pem = read_pair(ident)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, CertError):
        return "missing or unreadable"
    if key.public_key() != cert.public_key():
        return "key does not match certificate"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the current CA"
    if cert.not_valid_after_utc - _now() <= renew_within:
        return "expires soon"
    if _uri_sans(cert) != [ident.spiffe_id]:
        return "names another SPIFFE id"
    return None


def _uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def _current_namespace(certs_dir: Path, name: str) -> str:
    try:
        uris = _uri_sans(identity(certs_dir, name).certificate())
    except (OSError, ValueError):
        return DEFAULT_NAMESPACE
    m = re.fullmatch(rf"spiffe://{re.escape(TRUST_DOMAIN)}/ns/([^/]+)/sa/{re.escape(name)}", uris[0] if uris else "")
    return m.group(1) if m else DEFAULT_NAMESPACE


def _issue_leaf(
    ident: Identity, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, validity: dt.timedelta
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "servemesh"),
                    x509.NameAttribute(NameOID.COMMON_NAME, ident.name),
                ]
            )
        )
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + validity, ca.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), False)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(ident.spiffe_id),
                    x509.DNSName("localhost"),
                    x509.DNSName(ident.name),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _publish_pair(ident.dir, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _publish_pair(leaf_dir: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Write a new generation dir, then switch `.current` to it with one rename."""
    _mkdir_private(leaf_dir)
    previous = _current_target(leaf_dir)
    pair = f"{_PAIR_PREFIX}{time.time_ns()}"
    pair_dir = leaf_dir / pair
    _mkdir_private(pair_dir)
    write_atomic(pair_dir / "key.pem", key_pem, 0o600)
    write_atomic(pair_dir / "cert.pem", cert_pem, 0o644)
    _symlink_atomic(pair, leaf_dir / _CURRENT)
    for name in ("cert.pem", "key.pem"):
        link = leaf_dir / name
        if not (link.is_symlink() and os.readlink(link) == f"{_CURRENT}/{name}"):
            _symlink_atomic(f"{_CURRENT}/{name}", link)
    # Keep the previous generation for readers that resolved it just before the switch.
    for old in leaf_dir.glob(f"{_PAIR_PREFIX}*"):
        if old.name not in (pair, previous):
            shutil.rmtree(old, ignore_errors=True)


def _current_target(leaf_dir: Path) -> str | None:
    try:
        return os.readlink(leaf_dir / _CURRENT)
    except (FileNotFoundError, OSError):
        return None


def _pair_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    return key.public_key() == cert.public_key()


def _version(ident: Identity) -> tuple[object, ...]:
    def stat(p: Path) -> tuple[int, int] | None:
        try:
            st = p.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    return _current_target(ident.dir), stat(ident.cert_path), stat(ident.ca_path)
