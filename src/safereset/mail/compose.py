"""Building a MIME message (text and HTML parts) from the templates of one kind."""

from __future__ import annotations

from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

SUBJECTS = {
    "recovery_link": "Reset your password",
    "recovery_code": "Your password reset code",
    "password_changed": "Your password was changed",
}

_templates = Environment(
    loader=PackageLoader("safereset.mail", "templates"),
    autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)


def compose(
    kind: str,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    date: datetime,
    values: dict[str, Any],
) -> EmailMessage:
    """Render the message ``kind`` for ``recipient``; ``values`` fill the templates."""
    try:
        subject = SUBJECTS[kind]
    except KeyError:
        raise ValueError(f"unknown mail kind {kind!r}; known: {', '.join(SUBJECTS)}") from None
    values = {"recipient": recipient, **values}
    message = EmailMessage()
    message["From"] = sender
    message["To"] = recipient
    message["Subject"] = subject
    message["Date"] = format_datetime(date)
    message["Message-ID"] = message_id
    # Tell auto-responders and list software to leave a one-time link alone.
    message["Auto-Submitted"] = "auto-generated"
    text = _templates.get_template(f"{kind}.txt").render(values)
    html = _templates.get_template(f"{kind}.html").render(values)
    message.set_content(text, cte=_transfer_encoding(text))
    message.add_alternative(html, subtype="html", cte=_transfer_encoding(html))
    return message


def _transfer_encoding(body: str) -> str:
    # ASCII bodies go as 7bit, so the link stays whole on one line in .eml files
    # and in raw mail. Quoted-printable would escape "=" and break long lines.
    return "7bit" if body.isascii() else "quoted-printable"
