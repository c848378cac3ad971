"""The ``safereset`` command: serve, worker, migrate and user administration."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

import click

from safereset import audit, logs
from safereset.addresses import InvalidAddress
from safereset.diagrams import FORMATS, document, render
from safereset.errors import AccountDisabled, UserExists, UserNotFound
from safereset.machines import MACHINES
from safereset.passwords import PasswordRejected
from safereset.runtime import Runtime, build
from safereset.settings import Settings, SettingsError, load_settings
from safereset.store.db import DatabaseError, check_schema, migrate

# Errors an operator can fix; each becomes one line on standard error and exit 1.
OPERATOR_ERRORS = (
    SettingsError,
    DatabaseError,
    InvalidAddress,
    UserExists,
    UserNotFound,
    AccountDisabled,
    PasswordRejected,
)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OPERATOR_ERRORS as error:
            raise click.ClickException(str(error)) from None


def _runtime(*, migrate_first: bool = False) -> Runtime:
    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    runtime = build(settings)
    if migrate_first:
        migrate(runtime.service.engine)
    check_schema(runtime.service.engine)
    return runtime


@click.group(cls=_Group)
@click.version_option(package_name="safereset")
def cli() -> None:
    """Account recovery service. Settings come from SAFERESET_* environment variables."""


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--no-worker", is_flag=True, help="Do not deliver mail in this process.")
def serve(host: str, port: int, no_worker: bool) -> None:
    """Migrate the database, then serve the API and pages (and deliver mail)."""
    import uvicorn

    from safereset.web.app import create_app

    runtime = _runtime(migrate_first=True)
    app = create_app(runtime, run_worker=False if no_worker else None)
    _warn_if_links_point_elsewhere(runtime.settings, host, port)
    # Uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the
    # signal again under the handler that was installed before it started.
    # These no-op handlers make that a clean exit with status 0.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: None)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,  # the app logs each request without its query string
        proxy_headers=False,
        server_header=False,
    )


def _warn_if_links_point_elsewhere(settings: Settings, host: str, port: int) -> None:
    """Warn when the default public URL names another port than the one served."""
    if "public_url" in settings.model_fields_set:
        return
    public = urlsplit(settings.public_url)
    if public.port != port:
        logging.getLogger("safereset.cli").warning(
            "links in mail start with %s, but this server listens on %s:%s; "
            "set SAFERESET_PUBLIC_URL to the address people reach it at",
            settings.public_url,
            host,
            port,
        )


@cli.command()
@click.option("--once", is_flag=True, help="Deliver what is due now, then exit.")
def worker(once: bool) -> None:
    """Deliver queued mail until interrupted (SIGINT or SIGTERM)."""
    mail_worker = _runtime().worker()
    if once:
        sent = asyncio.run(mail_worker.deliver_due())
        click.echo(f"delivered {sent} message(s)")
        return

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await mail_worker.run(stop)

    asyncio.run(run())


@cli.command("migrate")
def migrate_command() -> None:
    """Create or upgrade the database schema."""
    settings = load_settings()
    logs.configure(settings.log_format, settings.log_level)
    runtime = build(settings)
    revision = migrate(runtime.service.engine)
    click.echo(f"database schema is at the newest revision ({revision})")


@cli.group()
def recovery() -> None:
    """Start recoveries on a user's behalf."""


@recovery.command("link")
@click.argument("email")
def recovery_link(email: str) -> None:
    """Print a one-time recovery link for EMAIL to hand over; no mail is sent.

    Older links and codes of the account stop working. The link is printed
    once, on standard output only, and is not logged or stored.
    """
    click.echo(_runtime().service.issue_operator_link(email))


@cli.command("audit")
@click.option("--user", "email", help="Only the events of this account.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 100000))
def audit_command(email: str | None, limit: int) -> None:
    """List audit events, newest first: time, event, user id, subject, client, detail."""
    runtime = _runtime()
    user_id = None
    if email is not None:
        user_id = runtime.service.find_user(email).user_id
    for entry in audit.entries(runtime.service.engine, user_id=user_id, limit=limit):
        fields = (entry.user_id, entry.subject, entry.client, entry.detail)
        rest = "\t".join("-" if value is None else str(value) for value in fields)
        click.echo(f"{entry.at.isoformat(timespec='seconds')}\t{entry.event}\t{rest}")


@cli.group()
def outbox() -> None:
    """Inspect and retry queued mail."""


@outbox.command("list")
@click.option("--dead", is_flag=True, help="Only messages that failed their last attempt.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1, 10000))
def outbox_list(dead: bool, limit: int) -> None:
    """List messages, newest first: id, kind, state, attempts, due time, last error."""
    for view in _runtime().outbox.list_messages(dead_only=dead, limit=limit):
        error = (view.last_error or "").replace("\t", " ")
        click.echo(
            f"{view.message_id}\t{view.kind}\t{view.state}\t{view.attempt}\t"
            f"{view.due_at.isoformat(timespec='seconds')}\t{error}"
        )


@outbox.command("retry")
@click.argument("message_id")
def outbox_retry(message_id: str) -> None:
    """Queue a dead message again; the worker delivers it with a fresh set of attempts."""
    try:
        _runtime().outbox.requeue(message_id)
    except (LookupError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo("requeued")


@cli.command()
@click.argument("machine", required=False, type=click.Choice(sorted(MACHINES)))
@click.option(
    "--format",
    "fmt",
    type=click.Choice([*FORMATS, "markdown-doc"]),
    default="table",
    show_default=True,
    help="table: Markdown transition table; mermaid: stateDiagram-v2; dot: Graphviz; "
    "markdown-doc: the whole of docs/machines.md.",
)
def diagram(machine: str | None, fmt: str) -> None:
    """Print the transition table of one machine or of all, or one machine's diagram."""
    if fmt == "markdown-doc":
        if machine:
            raise click.UsageError("markdown-doc covers every machine; name none")
        click.echo(document(), nl=False)
    elif machine:
        click.echo(render([machine], fmt), nl=False)
    elif fmt == "table":
        for name in MACHINES:
            click.echo(f"## {name}\n\n{render([name], fmt)}")
    else:
        raise click.UsageError(f"name a machine for {fmt} output: {', '.join(MACHINES)}")


@cli.group()
def user() -> None:
    """Manage accounts."""


@user.command("add")
@click.argument("email")
@click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from the first line of standard input. "
    "Without it the account has no password until the user recovers it.",
)
def user_add(email: str, password_stdin: bool) -> None:
    """Create an active account for EMAIL."""
    password = None
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise click.ClickException("no password on standard input")
    user_id = _runtime().service.add_user(email, password)
    click.echo(f"added user {user_id}")


@user.command("list")
def user_list() -> None:
    """List accounts: id, state, whether a password is set, address."""
    for view in _runtime().service.list_users():
        password = "password" if view.has_password else "no-password"
        click.echo(f"{view.user_id}\t{view.state}\t{password}\t{view.email}")


@user.command("disable")
@click.argument("email")
def user_disable(email: str) -> None:
    """Disable an account and end its sessions and recovery links."""
    _runtime().service.disable_user(email)
    click.echo("disabled")


@user.command("enable")
@click.argument("email")
def user_enable(email: str) -> None:
    """Enable a disabled account."""
    _runtime().service.enable_user(email)
    click.echo("enabled")


def main() -> None:
    cli()
