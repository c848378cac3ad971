"""PostgreSQL for the tests: one throw-away schema per test on the server that
``SAFERESET_TEST_POSTGRES_URL`` names.

Without that variable the PostgreSQL cases skip with the reason on a
developer's machine; in CI (``CI=true``) they fail, because CI has the server.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.availability import unavailable

URL_VARIABLE = "SAFERESET_TEST_POSTGRES_URL"


def postgres_base_url() -> str:
    url = os.environ.get(URL_VARIABLE)
    if not url:
        unavailable(
            f"{URL_VARIABLE} is not set; set it to a PostgreSQL URL such as "
            "postgresql+psycopg://postgres@127.0.0.1:5432/test to run these cases"
        )
    return url


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """Create an empty schema and yield a URL whose connections use only it."""
    base = make_url(postgres_base_url())
    schema = f"safereset_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as error:  # any failure means no server to test on
        admin.dispose()
        unavailable(f"cannot create a schema on {base.render_as_string()}: {error}")
    try:
        yield base.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
            hide_password=False
        )
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL schema for tests that need that backend alone."""
    with postgres_schema() as url:
        yield url
