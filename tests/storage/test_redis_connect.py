"""
Connecting to a real redis-server: over TLS (C{rediss://}, a certificate from
a trustme CA, which the proxy checks), and with a password.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
import trustme

from tests.conftest import get_reactor
from tests.servers import find_binary, free_port, stop_process, wait_until
from txpypi.storage.metadata import PageRecord
from txpypi.storage.outages import Unavailable
from txpypi.storage.redismeta import RedisMetadata, connect, parse_redis_url


@attrs.frozen
class TLSRedis:
    port: int
    ca_file: Path
    other_ca_file: Path


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TLSRedis]:
    ca, other = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("localhost")
    files = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "ca", "other")}
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    ca.cert_pem.write_to_path(str(files["ca"]))
    other.cert_pem.write_to_path(str(files["other"]))
    port = free_port()
    log = tmp_path / "redis.log"
    args = [
        find_binary("redis-server", "Debian package redis-server"),
        "--port",
        "0",
        "--tls-port",
        str(port),
    ]
    args += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    args += ["--tls-cert-file", str(files["cert"]), "--tls-key-file", str(files["key"])]
    args += ["--tls-ca-cert-file", str(files["ca"]), "--tls-auth-clients", "no"]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(files["ca"]))

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"PING\r\n")
                return tls.recv(16).startswith(b"+PONG")

    try:
        wait_until(ready, time.monotonic() + 20, "redis-server (TLS)", process, log)
        yield TLSRedis(port, files["ca"], files["other"])
    finally:
        stop_process(process)


@pytest_twisted.ensureDeferred
async def test_rediss_checks_the_servers_certificate(tls_redis: TLSRedis) -> None:
    good = RedisMetadata(
        connect(f"rediss://localhost:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca_file}", 2),
        clock=get_reactor(),
    )
    record = PageRecord("k", "http://u/simple/", "http://u/simple/p/", b"{}", 1.0)
    try:
        await good.put_page(record)
        assert await good.get_page("k") == record
    finally:
        await good.close()
    # A server whose certificate another CA signed is not talked to.
    wrong = RedisMetadata(
        connect(f"rediss://localhost:{tls_redis.port}/0?ssl_ca_certs={tls_redis.other_ca_file}", 1),
        clock=get_reactor(),
    )
    try:
        with pytest.raises(Unavailable):
            await wrong.get_page("k")
    finally:
        await wrong.close()


def test_redis_url_tls_parameters() -> None:
    url = parse_redis_url("rediss://cache.example:6390/0?ssl_ca_certs=/etc/ca.pem")
    assert (url.tls, url.ca_file) == (True, "/etc/ca.pem")
    for bad in ("redis://h/0?ssl_ca_certs=/ca.pem", "rediss://h/0?verify=no"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


@pytest_twisted.ensureDeferred
async def test_redis_with_a_password(tmp_path: Path) -> None:
    """
    C{redis://:password@host:port/db}: the password is sent (AUTH), and a
    wrong one gets no answers.
    """
    port = free_port()
    log = tmp_path / "redis.log"
    args = [
        find_binary("redis-server", "Debian package redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
    ]
    args += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", "s3cret/pass"]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"-NOAUTH")

    try:
        wait_until(ready, time.monotonic() + 20, "redis-server (password)", process, log)
        good = RedisMetadata(connect(f"redis://:s3cret%2Fpass@127.0.0.1:{port}/2", 2), clock=get_reactor())
        record = PageRecord("k", "http://u/simple/", "http://u/simple/p/", b"{}", 1.0)
        try:
            await good.put_page(record)
            assert await good.get_page("k") == record
        finally:
            await good.close()
        wrong = RedisMetadata(connect(f"redis://:nope@127.0.0.1:{port}/2", 1), clock=get_reactor())
        try:
            with pytest.raises(Unavailable):
                await wrong.get_page("k")
        finally:
            await wrong.close()
    finally:
        stop_process(process)
