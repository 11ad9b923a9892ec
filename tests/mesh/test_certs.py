"""The local CA and mesh identities: contents, file modes, idempotence, rotation, renewal, gRPC credentials."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import stat
import threading
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from typer.testing import CliRunner

import mesh.certs as certs
from mesh.certs import (
    DEFAULT_IDENTITIES,
    CertError,
    channel_credentials,
    dynamic_server_credentials,
    ensure_identities,
    read_pair,
    rotate,
    server_credentials,
    spiffe_id,
)
from mesh.cli_certs import certs_app
from tests.mesh.envoy_fixtures import peer_serial


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_leaf_carries_spiffe_and_dns_sans_both_ekus_and_a_short_validity(tmp_path: Path) -> None:
    ident = ensure_identities(tmp_path, ["gateway"])["gateway"]
    cert = ident.certificate()
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://servemesh.local/ns/default/sa/gateway"]
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "gateway"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - _now()
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    ca = x509.load_pem_x509_certificate(ident.ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ident.spiffe_id == spiffe_id("gateway") and ident.ca_path == tmp_path / "ca.crt"
    assert ident.cert_path == tmp_path / "gateway" / "cert.pem" and ident.key_path == tmp_path / "gateway" / "key.pem"
    key = serialization.load_pem_private_key(ident.key_path.read_bytes(), None)
    assert key.public_key() == cert.public_key() and key.curve.name == "secp256r1"  # type: ignore[union-attr]


def test_ca_is_a_path_constrained_ca_for_about_ten_years(tmp_path: Path) -> None:
    ensure_identities(tmp_path, ["cli"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True and bc.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert dt.timedelta(days=3640) < ca.not_valid_after_utc - _now() <= dt.timedelta(days=3650)


def test_keys_are_0600_and_dirs_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        idents = ensure_identities(tmp_path / "certs", DEFAULT_IDENTITIES)
        rotate(tmp_path / "certs", ["edge"])
    finally:
        os.umask(old)
    base = tmp_path / "certs"
    assert _mode(base) == 0o700 and _mode(base / "ca.key") == 0o600
    for ident in idents.values():
        assert _mode(ident.dir) == 0o700
        assert _mode(ident.key_path) == 0o600  # follows the symlink to the live generation
        for pair in ident.dir.glob(".pair-*"):
            assert _mode(pair) == 0o700 and _mode(pair / "key.pem") == 0o600
    leftovers = [p for p in base.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_key_files_are_created_0600_never_widened_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[tuple[str, int, int]] = []
    real_open = os.open

    def spy(path: object, flags: int, mode: int = 0o777, *a: object, **kw: object) -> int:
        created.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(certs.os, "open", spy)
    ensure_identities(tmp_path, ["gateway", "registry"])
    rotate(tmp_path, ["gateway"])
    key_opens = [(p, f, m) for p, f, m in created if "key" in Path(p).name and f & os.O_CREAT and "lock" not in p]
    assert len(key_opens) == 4  # CA + two leaves + one rotation
    for path, flags, mode in key_opens:
        assert mode == 0o600 and flags & os.O_EXCL, path


def test_ensure_is_idempotent(tmp_path: Path) -> None:
    first = ensure_identities(tmp_path, ["gateway", "inference"])
    serials = {n: i.certificate().serial_number for n, i in first.items()}
    ca = (tmp_path / "ca.crt").read_bytes()
    key_inode = first["gateway"].key_path.stat().st_ino
    again = ensure_identities(tmp_path, ["gateway", "inference", "registry"])
    assert {n: again[n].certificate().serial_number for n in serials} == serials
    assert (tmp_path / "ca.crt").read_bytes() == ca
    assert again["gateway"].key_path.stat().st_ino == key_inode
    assert "registry" in again and certs.existing_identities(tmp_path) == ["gateway", "inference", "registry"]


def test_rotate_issues_a_new_pair_under_the_same_ca_in_one_switch(tmp_path: Path) -> None:
    ident = ensure_identities(tmp_path, ["gateway", "cli"])["gateway"]
    before = ident.certificate()
    ca = (tmp_path / "ca.crt").read_bytes()
    for _ in range(3):
        rotated = rotate(tmp_path, ["gateway"])
    assert list(rotated) == ["gateway"]
    after = ident.certificate()
    assert after.serial_number != before.serial_number
    assert after.public_key() != before.public_key()
    assert (tmp_path / "ca.crt").read_bytes() == ca
    cert_pem, key_pem = read_pair(ident)
    key = serialization.load_pem_private_key(key_pem, None)
    assert key.public_key() == x509.load_pem_x509_certificate(cert_pem).public_key()
    assert len(list(ident.dir.glob(".pair-*"))) == 2  # the live generation and the one before
    assert set(rotate(tmp_path)) == {"gateway", "cli"}  # default: every identity


def test_a_reader_never_sees_a_mismatched_pair_during_rotations(tmp_path: Path) -> None:
    ident = ensure_identities(tmp_path, ["registry"])["registry"]
    stop = threading.Event()
    bad: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            cert_pem, key_pem = read_pair(ident)
            key = serialization.load_pem_private_key(key_pem, None)
            if key.public_key() != x509.load_pem_x509_certificate(cert_pem).public_key():
                bad.append("mismatch")
            reads += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(30):
            rotate(tmp_path, ["registry"])
    finally:
        stop.set()
        t.join()
    assert bad == [] and reads > 30


def test_expiring_leaf_is_renewed_and_valid_one_kept(tmp_path: Path) -> None:
    short = ensure_identities(tmp_path, ["gateway"], leaf_validity=dt.timedelta(days=2))["gateway"]
    old = short.certificate().serial_number
    keep = ensure_identities(tmp_path, ["gateway"], renew_within=dt.timedelta(days=1))["gateway"]
    assert keep.certificate().serial_number == old
    renewed = ensure_identities(tmp_path, ["gateway"])["gateway"].certificate()
    assert renewed.serial_number != old
    assert renewed.not_valid_after_utc - _now() > dt.timedelta(days=29)


def test_a_new_ca_reissues_every_leaf_even_unnamed_ones(tmp_path: Path) -> None:
    old = ensure_identities(tmp_path, ["gateway", "edge", "cli"])
    old_serials = {n: i.certificate().serial_number for n, i in old.items()}
    (tmp_path / "ca.key").unlink()
    ensure_identities(tmp_path, ["gateway", "edge"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    for name, ident in old.items():
        assert ident.certificate().serial_number != old_serials[name]
        ident.certificate().verify_directly_issued_by(ca)
    (tmp_path / "ca.crt").unlink()
    rotate(tmp_path, ["cli"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    for ident in old.values():
        ident.certificate().verify_directly_issued_by(ca)


def test_namespace_is_part_of_the_identity(tmp_path: Path) -> None:
    ensure_identities(tmp_path, ["gateway"])
    prod = ensure_identities(tmp_path, ["gateway"], namespace="prod")["gateway"]
    assert prod.spiffe_id == "spiffe://servemesh.local/ns/prod/sa/gateway"
    uris = prod.certificate().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [prod.spiffe_id]
    assert rotate(tmp_path, ["gateway"])["gateway"].spiffe_id == prod.spiffe_id


@pytest.mark.parametrize("name", ["../evil", "Gateway", "", "a/b", "-x"])
def test_bad_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(CertError, match="invalid identity name"):
        ensure_identities(tmp_path, [name])
    assert not (tmp_path / "evil").exists()


async def _health_server(creds: grpc.ServerCredentials) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, port


async def _check(port: int, creds: grpc.ChannelCredentials) -> int:
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return resp.status


async def test_grpc_mtls_credentials(tmp_path: Path) -> None:
    idents = ensure_identities(tmp_path, ["registry", "cli"])
    server, port = await _health_server(server_credentials(idents["registry"]))
    try:
        assert await _check(port, channel_credentials(idents["cli"])) == health_pb2.HealthCheckResponse.SERVING
        no_cert = grpc.ssl_channel_credentials(root_certificates=idents["cli"].ca_path.read_bytes())
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _check(port, no_cert)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


async def test_dynamic_server_credentials_pick_up_a_rotation(tmp_path: Path) -> None:
    idents = ensure_identities(tmp_path, ["registry", "cli"])
    server, port = await _health_server(dynamic_server_credentials(idents["registry"]))
    ca = str(idents["cli"].ca_path)
    try:
        before = await asyncio.to_thread(peer_serial, port, idents["cli"], ca)
        assert before == idents["registry"].certificate().serial_number
        rotate(tmp_path, ["registry"])
        after = await asyncio.to_thread(peer_serial, port, idents["cli"], ca)
        assert after == idents["registry"].certificate().serial_number != before
        assert await _check(port, channel_credentials(idents["cli"])) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


def test_cli_lists_identities_and_rotates(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(certs_app, ["--home", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    for name in DEFAULT_IDENTITIES:
        assert spiffe_id(name) in listed.output
    gateway = certs.identity(tmp_path / "certs", "gateway")
    before = gateway.certificate().serial_number
    rotated = runner.invoke(certs_app, ["rotate", "gateway", "--home", str(tmp_path)])
    assert rotated.exit_code == 0, rotated.output
    assert gateway.certificate().serial_number != before
    assert f"{gateway.certificate().serial_number:x}"[:16] in rotated.output
    bad = runner.invoke(certs_app, ["--home", str(tmp_path), "rotate", "Not/Valid"])
    assert bad.exit_code == 1 and "invalid identity name" in bad.output
