"""Headers every response carries, and the shape of the tokens the service issues."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from safereset import crypto
from safereset.mail.transports import FolderTransport
from safereset.runtime import Runtime, build
from safereset.settings import SECRET_KEY_FILE, Settings
from safereset.store.db import migrate
from safereset.web.app import create_app
from tests.conftest import make_settings

# One route of each kind: a page, the JSON API, an error, a static file.
ROUTES = [
    ("GET", "/forgot"),
    ("GET", "/recover/code?flow=0"),
    ("POST", "/api/recovery"),
    ("GET", "/api/sessions/current"),
    ("GET", "/no-such-page"),
    ("GET", "/static/safereset.css"),
    ("GET", "/healthz"),
]


@pytest.mark.threat("T04", "T06", "T20")
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_response_hardened(client: TestClient, method: str, path: str) -> None:
    response = client.request(method, path, json={"email": "alice@example.com"})

    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "form-action 'self'" in policy
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"


def test_https_public_url_sends_hsts(client: TestClient) -> None:
    response = client.get("/forgot")

    assert response.headers["strict-transport-security"].startswith("max-age=")


@pytest.fixture
def http_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, public_url="http://127.0.0.1:8000")
    runtime: Runtime = build(settings)
    migrate(runtime.service.engine)
    with TestClient(create_app(runtime, run_worker=False)) as test_client:
        yield test_client
    runtime.service.engine.dispose()


def test_http_public_url_omits_hsts(http_client: TestClient) -> None:
    response = http_client.get("/forgot")

    assert "strict-transport-security" not in response.headers


@pytest.mark.threat("T01")
def test_token_shape_and_uniqueness() -> None:
    tokens = {crypto.new_token() for _ in range(10_000)}

    assert len(tokens) == 10_000
    for token in list(tokens)[:100]:
        assert crypto.is_well_formed(token)
        # 43 URL-safe base64 characters carry 258 bits, of which 256 are random.
        assert len(token) == len(crypto.TOKEN_PREFIX) + 43


@pytest.mark.threat("T01", "T07")
def test_digest_is_keyed_per_purpose() -> None:
    ring = crypto.Keyring([b"k" * 32])
    other = crypto.Keyring([b"j" * 32])
    token = crypto.new_token()

    assert ring.digest("ticket", token) != ring.digest("session", token)
    assert ring.digest("ticket", token) != other.digest("ticket", token)
    assert token not in ring.digest("ticket", token)


@pytest.mark.threat("T30")
def test_data_files_owner_only(tmp_path: Path) -> None:
    # The database contains password hashes and the outbox recovery links, so
    # other local users must not read either.
    data_dir = tmp_path / "data"
    settings = Settings(data_dir=data_dir, public_url="https://reset.example.test")
    runtime = build(settings)
    try:
        migrate(runtime.service.engine)
        runtime.service.add_user("alice@example.com")
        mail = EmailMessage()
        mail["Message-ID"] = "<permissions@example.test>"
        mail.set_content("a message")
        asyncio.run(FolderTransport(data_dir / "outbox").send(mail))

        database = data_dir / "safereset.db"
        files = [database, Path(f"{database}-wal"), data_dir / SECRET_KEY_FILE]
        files += list((data_dir / "outbox").iterdir())
        folders = [data_dir, data_dir / "outbox"]
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        for path in folders:
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    finally:
        runtime.service.engine.dispose()
