"""Settings from SAFERESET_* environment variables: defaults, validation and the key file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from safereset.settings import SECRET_KEY_FILE, SettingsError, load_settings

VALID_KEY = "k" * 32


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Remove every SAFERESET_* variable and run in an empty working folder."""
    for name in list(os.environ):
        if name.startswith("SAFERESET_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def sqlite_path(url: str) -> Path:
    parsed = make_url(url)
    assert parsed.get_backend_name() == "sqlite"
    assert parsed.database is not None
    return Path(parsed.database).resolve()


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings()

    assert settings.data_dir.resolve() == tmp_path / "safereset-data"
    assert sqlite_path(settings.resolved_database_url) == tmp_path / "safereset-data/safereset.db"
    assert settings.public_url == "http://127.0.0.1:8000"
    assert settings.secret_key is None
    assert settings.resolved_mail_url == (tmp_path / "safereset-data/outbox").as_uri()
    assert settings.mail_from == "safereset <no-reply@localhost>"
    assert settings.token_ttl_seconds == 1800
    assert settings.log_format == "text"


def test_defaults_follow_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data_dir = tmp_path / "elsewhere"
    monkeypatch.setenv("SAFERESET_DATA_DIR", str(data_dir))

    settings = load_settings()

    assert sqlite_path(settings.resolved_database_url) == data_dir / "safereset.db"
    assert settings.resolved_mail_url == (data_dir / "outbox").as_uri()


def test_values_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFERESET_DATABASE_URL", "sqlite:////var/lib/safereset/main.db")
    monkeypatch.setenv("SAFERESET_PUBLIC_URL", "https://reset.example.test/")
    monkeypatch.setenv("SAFERESET_SECRET_KEY", VALID_KEY)
    monkeypatch.setenv("SAFERESET_MAIL_URL", "smtps://mailer:secret@127.0.0.1:2465")
    monkeypatch.setenv("SAFERESET_MAIL_FROM", "Reset <reset@example.test>")
    monkeypatch.setenv("SAFERESET_TOKEN_TTL_SECONDS", "600")
    monkeypatch.setenv("SAFERESET_LOG_FORMAT", "json")

    settings = load_settings()

    assert settings.resolved_database_url == "sqlite:////var/lib/safereset/main.db"
    assert settings.public_url == "https://reset.example.test"  # trailing slash removed
    assert settings.load_secret_key() == VALID_KEY.encode()
    assert settings.resolved_mail_url == "smtps://mailer:secret@127.0.0.1:2465"
    assert settings.mail_from == "Reset <reset@example.test>"
    assert settings.token_ttl_seconds == 600
    assert settings.log_format == "json"


@pytest.mark.parametrize(
    "mail_url",
    [
        "smtp://user:pass@127.0.0.1:25",
        "smtp://127.0.0.1",
        "smtps://127.0.0.1:465",
        "smtp+starttls://user:p%40ss@127.0.0.1:587",
        "file:///var/spool/safereset",
    ],
)
def test_mail_url_accepted(monkeypatch: pytest.MonkeyPatch, mail_url: str) -> None:
    monkeypatch.setenv("SAFERESET_MAIL_URL", mail_url)

    assert load_settings().resolved_mail_url == mail_url


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAFERESET_PUBLIC_URL", "ftp://reset.example.test"),
        ("SAFERESET_PUBLIC_URL", "reset.example.test"),
        ("SAFERESET_PUBLIC_URL", "https://"),
        ("SAFERESET_PUBLIC_URL", "https://reset.example.test/?next=/admin"),
        ("SAFERESET_PUBLIC_URL", "https://reset.example.test/#top"),
        ("SAFERESET_MAIL_URL", "imap://127.0.0.1"),
        ("SAFERESET_MAIL_URL", "127.0.0.1:25"),
        ("SAFERESET_MAIL_URL", "smtp://"),
        ("SAFERESET_MAIL_URL", "smtp://user:pass@:25"),
        ("SAFERESET_MAIL_URL", "smtps:///path"),
        ("SAFERESET_MAIL_URL", "smtp://127.0.0.1:port"),
        ("SAFERESET_MAIL_URL", "smtp://127.0.0.1:99999"),
        ("SAFERESET_MAIL_URL", "file://"),
        ("SAFERESET_TOKEN_TTL_SECONDS", "0"),
        ("SAFERESET_TOKEN_TTL_SECONDS", "-1800"),
        ("SAFERESET_TOKEN_TTL_SECONDS", "thirty"),
        ("SAFERESET_TOKEN_TTL_SECONDS", "1.5"),
        ("SAFERESET_SECRET_KEY", "k" * 31),
        ("SAFERESET_SECRET_KEY", "short"),
        ("SAFERESET_LOG_FORMAT", "xml"),
        ("SAFERESET_PUBLIC_URL", "https://reset.example.test/base"),
        ("SAFERESET_MAIL_FROM", "garbage"),
        ("SAFERESET_MAIL_FROM", "safereset <@example.test>"),
        ("SAFERESET_MAIL_LEASE_SECONDS", "30"),
        ("SAFERESET_HASH_QUEUE_SIZE", "-1"),
        ("SAFERESET_HASH_QUEUE_SIZE", "many"),
        ("SAFERESET_HASH_WAIT_SECONDS", "0"),
        ("SAFERESET_HASH_WAIT_SECONDS", "31"),
    ],
)
def test_invalid_value_names_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(SettingsError) as raised:
        load_settings()

    assert variable in str(raised.value)


def test_invalid_secret_key_not_in_message(monkeypatch: pytest.MonkeyPatch) -> None:
    short_key = "do-not-print-this-key"
    monkeypatch.setenv("SAFERESET_SECRET_KEY", short_key)

    with pytest.raises(SettingsError) as raised:
        load_settings()

    assert short_key not in str(raised.value)


def test_every_invalid_variable_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFERESET_PUBLIC_URL", "ftp://reset.example.test")
    monkeypatch.setenv("SAFERESET_TOKEN_TTL_SECONDS", "0")

    with pytest.raises(SettingsError) as raised:
        load_settings()

    assert "SAFERESET_PUBLIC_URL" in str(raised.value)
    assert "SAFERESET_TOKEN_TTL_SECONDS" in str(raised.value)


def test_secret_key_of_32_multibyte_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "é" * 16  # 16 characters, 32 bytes in UTF-8
    monkeypatch.setenv("SAFERESET_SECRET_KEY", key)

    assert load_settings().load_secret_key() == key.encode()


def test_key_file_created_on_first_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data_dir = tmp_path / "new" / "data"
    monkeypatch.setenv("SAFERESET_DATA_DIR", str(data_dir))

    key = load_settings().load_secret_key()

    key_file = data_dir / SECRET_KEY_FILE
    assert key_file.read_bytes().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(key) >= 32


def test_key_file_reused_on_second_run() -> None:
    first = load_settings().load_secret_key()

    second = load_settings().load_secret_key()

    assert second == first


def test_key_file_differs_per_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFERESET_DATA_DIR", str(tmp_path / "one"))
    first = load_settings().load_secret_key()
    monkeypatch.setenv("SAFERESET_DATA_DIR", str(tmp_path / "two"))

    second = load_settings().load_secret_key()

    assert second != first


def test_key_file_not_written_when_key_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFERESET_SECRET_KEY", VALID_KEY)

    load_settings().load_secret_key()

    assert not (tmp_path / "safereset-data" / SECRET_KEY_FILE).exists()


def test_key_file_written_by_operator_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFERESET_DATA_DIR", str(tmp_path))
    (tmp_path / SECRET_KEY_FILE).write_text(VALID_KEY + "\n", encoding="ascii")

    assert load_settings().load_secret_key() == VALID_KEY.encode()


def test_key_file_too_short(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SAFERESET_DATA_DIR", str(tmp_path))
    (tmp_path / SECRET_KEY_FILE).write_text("k" * 31, encoding="ascii")

    with pytest.raises(SettingsError) as raised:
        load_settings().load_secret_key()

    assert SECRET_KEY_FILE in str(raised.value)
    assert "SAFERESET_SECRET_KEY" in str(raised.value)


def test_log_level_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFERESET_LOG_LEVEL", "debug")

    assert load_settings().log_level == "DEBUG"
