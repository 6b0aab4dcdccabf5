"""Fixtures shared by every test level."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Server, bind_ports, make_home  # noqa: E402

PG_URL = os.environ.get("MAILGATE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(autouse=True)
def no_server_outlives_its_test():
    """A test that fails half way leaves no `mailgate serve` behind (it would hold ports and CPU)."""
    yield
    for server in list(Server.running):
        server.stop()


@pytest.fixture
def home(tmp_path: Path):
    """A fresh data directory for server EX01 with accepted domain domain.com."""
    return make_home(tmp_path / "home")


@pytest.fixture
def ports(home):
    return bind_ports(home)


@pytest.fixture
def server(home, ports):
    """A running `mailgate serve` for ``home`` with the default connectors on loopback ports."""
    srv = Server(home)
    srv.ports = ports
    srv.start()
    yield srv
    srv.stop()


def postgres_available() -> bool:
    import psycopg

    try:
        with psycopg.connect(PG_URL.replace("postgresql://", "postgresql://", 1), connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture
def postgres_url():
    """A fresh schema in the test PostgreSQL; a missing server fails under CI=true and skips otherwise."""
    import psycopg

    if not postgres_available():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required under CI=true but {PG_URL} is unreachable")
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable")
    schema = f"mg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")
