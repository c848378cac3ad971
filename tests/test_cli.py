"""The `safereset` console script, run as a subprocess the way an operator runs it."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from email import message_from_bytes, policy
from pathlib import Path

import httpx2
import pytest

from safereset.runtime import Runtime, build
from safereset.store.db import check_schema, make_engine, migrate
from tests.conftest import SECRET_KEY, free_port, make_settings, text_body

SAFERESET = Path(sys.executable).with_name("safereset")
COMMAND_TIMEOUT_SECONDS = 60
START_TIMEOUT_SECONDS = 30
STOP_TIMEOUT_SECONDS = 15
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")
PASSWORD = "correct horse battery"


def cli_environment(data_dir: Path, **variables: str | None) -> dict[str, str]:
    """Return this process's environment without SAFERESET_* plus a data folder and a key.

    ``variables`` set more variables, and a value of None removes one.
    """
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("SAFERESET_")
    }
    environment["SAFERESET_DATA_DIR"] = str(data_dir)
    environment["SAFERESET_SECRET_KEY"] = SECRET_KEY
    for name, value in variables.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


def run_cli(
    data_dir: Path, *args: str, stdin: str = "", **variables: str | None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SAFERESET), *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=data_dir,
        env=cli_environment(data_dir, **variables),
        timeout=COMMAND_TIMEOUT_SECONDS,
        check=False,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Check that a command failed with one line of error and return that line.

    Log lines on standard error are left out of the count.
    """
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def runtime_on_disk(tmp_path: Path) -> Iterator[Runtime]:
    """A migrated database in tmp_path, where the CLI finds it by default."""
    runtime = build(make_settings(tmp_path))
    migrate(runtime.service.engine)
    yield runtime
    runtime.service.engine.dispose()


def user_rows(data_dir: Path) -> list[list[str]]:
    result = run_cli(data_dir, "user", "list")
    assert result.returncode == 0, result.stderr
    return [line.split("\t") for line in result.stdout.splitlines()]


# Help and migrations


def test_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--help")

    assert result.returncode == 0
    for command in ("serve", "worker", "migrate", "user"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


def test_user_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "user", "--help")

    assert result.returncode == 0
    for command in ("add", "list", "disable", "enable"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), command


def test_migrate_creates_database(tmp_path: Path) -> None:
    first = run_cli(tmp_path, "migrate")
    second = run_cli(tmp_path, "migrate")

    assert first.returncode == 0, first.stderr
    assert first.stdout == "database schema is at the newest revision (0002)\n"
    assert (tmp_path / "safereset.db").is_file()
    assert second.returncode == 0, second.stderr
    assert second.stdout == "database schema is at the newest revision (0002)\n"


def test_generated_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "secret.key"

    first = run_cli(tmp_path, "migrate", SAFERESET_SECRET_KEY=None)
    key = key_file.read_text()
    second = run_cli(tmp_path, "user", "list", SAFERESET_SECRET_KEY=None)

    assert first.returncode == 0, first.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert second.returncode == 0, second.stderr
    assert key_file.read_text() == key


# Users


def test_user_add_and_list(tmp_path: Path) -> None:
    run_cli(tmp_path, "migrate")

    without_password = run_cli(tmp_path, "user", "add", "Alice@Example.com")
    with_password = run_cli(
        tmp_path, "user", "add", "bob@example.com", "--password-stdin", stdin=PASSWORD + "\n"
    )

    assert without_password.returncode == 0, without_password.stderr
    assert without_password.stdout == "added user 1\n"
    assert with_password.returncode == 0, with_password.stderr
    assert with_password.stdout == "added user 2\n"
    assert user_rows(tmp_path) == [
        ["1", "active", "no-password", "Alice@example.com"],
        ["2", "active", "password", "bob@example.com"],
    ]


def test_user_password_from_stdin(tmp_path: Path, runtime_on_disk: Runtime) -> None:
    run_cli(tmp_path, "user", "add", "bob@example.com", "--password-stdin", stdin=PASSWORD + "\n")

    session = runtime_on_disk.service.log_in("bob@example.com", PASSWORD)

    assert runtime_on_disk.service.authenticate(session).email == "bob@example.com"


def test_user_disable_and_enable(tmp_path: Path, runtime_on_disk: Runtime) -> None:
    runtime_on_disk.service.add_user("alice@example.com")

    disabled = run_cli(tmp_path, "user", "disable", "ALICE@example.com")
    state_after_disable = user_rows(tmp_path)[0][1]
    enabled = run_cli(tmp_path, "user", "enable", "alice@example.com")
    state_after_enable = user_rows(tmp_path)[0][1]

    assert disabled.returncode == 0, disabled.stderr
    assert disabled.stdout == "disabled\n"
    assert state_after_disable == "disabled"
    assert enabled.returncode == 0, enabled.stderr
    assert enabled.stdout == "enabled\n"
    assert state_after_enable == "active"


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["alice@example.com"], "", "exists"),
        (["ALICE@EXAMPLE.COM"], "", "exists"),
        (["not-an-address"], "", "@"),
        (["bob@example.com", "--password-stdin"], "short\n", "at least 8 characters"),
        (["bob@example.com", "--password-stdin"], "", "no password"),
        (["bob@example.com", "--password-stdin"], "\n", "no password"),
    ],
    ids=["duplicate", "case-variant", "invalid-address", "short-password", "no-stdin", "empty"],
)
def test_user_add_error(
    tmp_path: Path, runtime_on_disk: Runtime, args: list[str], stdin: str, expected: str
) -> None:
    runtime_on_disk.service.add_user("alice@example.com")

    result = run_cli(tmp_path, "user", "add", *args, stdin=stdin)

    assert expected in error_line(result)
    assert len(runtime_on_disk.service.list_users()) == 1


@pytest.mark.parametrize("command", ["disable", "enable"])
def test_unknown_user(tmp_path: Path, runtime_on_disk: Runtime, command: str) -> None:
    result = run_cli(tmp_path, "user", command, "nobody@example.com")

    assert "no account for nobody@example.com" in error_line(result)


# Start-up errors


@pytest.mark.parametrize(
    "args",
    [
        ["migrate"],
        ["user", "list"],
        ["worker", "--once"],
        ["serve", "--port", "0"],
    ],
    ids=" ".join,
)
def test_invalid_settings(tmp_path: Path, args: list[str]) -> None:
    result = run_cli(tmp_path, *args, SAFERESET_PUBLIC_URL="ftp://reset.example.test")

    assert "SAFERESET_PUBLIC_URL" in error_line(result)


def test_user_list_before_migrate(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "user", "list")

    assert "run `safereset migrate`" in error_line(result)


@pytest.mark.parametrize(
    ("case", "args"),
    [
        pytest.param("parent-is-file", ["migrate"], id="parent-is-file-migrate"),
        pytest.param("parent-is-file", ["user", "list"], id="parent-is-file-list"),
        pytest.param("grandparent-is-file", ["migrate"], id="grandparent-is-file"),
        pytest.param("path-is-folder", ["migrate"], id="path-is-folder"),
        pytest.param("not-a-url", ["migrate"], id="not-a-url"),
        pytest.param("unknown-dialect", ["migrate"], id="unknown-dialect"),
        pytest.param("postgresql-closed-port", ["user", "list"], id="postgresql-closed-port"),
    ],
)
def test_database_unusable(tmp_path: Path, case: str, args: list[str]) -> None:
    regular_file = tmp_path / "regular-file"
    regular_file.write_text("")
    urls = {
        "parent-is-file": f"sqlite:///{regular_file}/safereset.db",
        "grandparent-is-file": f"sqlite:///{regular_file}/sub/safereset.db",
        "path-is-folder": f"sqlite:///{tmp_path}",
        "not-a-url": "not a database url",
        "unknown-dialect": "nosuchdialect://127.0.0.1/safereset",
        "postgresql-closed-port": f"postgresql://safereset@127.0.0.1:{free_port()}/safereset",
    }

    result = run_cli(tmp_path, *args, SAFERESET_DATABASE_URL=urls[case])

    error_line(result)


# Worker


def test_worker_once_delivers(tmp_path: Path, runtime_on_disk: Runtime) -> None:
    runtime_on_disk.service.add_user("alice@example.com")
    runtime_on_disk.service.request_recovery("alice@example.com")

    first = run_cli(tmp_path, "worker", "--once")
    second = run_cli(tmp_path, "worker", "--once")

    assert first.returncode == 0, first.stderr
    assert first.stdout == "delivered 1 message(s)\n"
    assert second.stdout == "delivered 0 message(s)\n"
    [eml] = (tmp_path / "outbox").glob("*.eml")
    mail = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert mail["To"] == "alice@example.com"
    assert re.search(r"^http://127\.0\.0\.1:8000/recover\?token=srt_\S+$", text_body(mail), re.M)


def wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while text not in path.read_text():
        assert process.poll() is None, path.read_text()
        assert time.monotonic() < deadline, f"no {text!r} in {path.read_text()}"
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes]) -> int | None:
    """Send SIGTERM and return the exit code, or None if the process did not exit in time."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Collect the processes a test starts, and kill any that still run at its end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_cli(
    data_dir: Path, processes: list[subprocess.Popen[bytes]], *args: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start a long-running command and return it with the file that receives its stderr."""
    stderr_path = data_dir / f"{args[0]}.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [str(SAFERESET), *args],
            cwd=data_dir,
            env=cli_environment(data_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    processes.append(process)
    return process, stderr_path


def test_worker_stops_on_sigterm(
    tmp_path: Path, runtime_on_disk: Runtime, processes: list[subprocess.Popen[bytes]]
) -> None:
    worker, stderr_path = start_cli(tmp_path, processes, "worker")
    wait_for_text(stderr_path, "worker started", worker)

    exit_code = stop(worker)

    assert exit_code == 0, stderr_path.read_text()
    assert "worker stopped" in stderr_path.read_text()


# Serve


def wait_for_health(url: str, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    with httpx2.Client(trust_env=False, timeout=2.0) as http:
        while True:
            assert process.poll() is None, stderr_path.read_text()
            assert time.monotonic() < deadline, stderr_path.read_text()
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.1)


@pytest.mark.e2e
def test_serve_migrates_and_stops(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    server, stderr_path = start_cli(tmp_path, processes, "serve", "--port", str(port))
    wait_for_health(f"http://127.0.0.1:{port}/healthz", server, stderr_path)

    engine = make_engine(f"sqlite:///{tmp_path / 'safereset.db'}")
    try:
        check_schema(engine)
    finally:
        engine.dispose()
    exit_code = stop(server)

    assert exit_code is not None, "serve did not exit after SIGTERM"
    assert "Application shutdown complete" in stderr_path.read_text()
    assert exit_code == 0, stderr_path.read_text()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["diagram", "--format", "mermaid"], "name a machine for mermaid output"),
        (["diagram", "ticket", "--format", "markdown-doc"], "markdown-doc covers every machine"),
    ],
)
def test_diagram_usage_error(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_cli(tmp_path, *args)

    assert result.returncode == 2
    assert expected in result.stderr


def test_diagram_tables_have_headings(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "diagram")

    assert result.returncode == 0
    for name in ("ticket", "session", "account", "message"):
        assert f"## {name}\n" in result.stdout
