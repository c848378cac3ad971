"""A minimal fastapi-users application with the login and reset-password routes.

Settings come from the environment: PEER_DATABASE_URL (``sqlite:////path.db`` or
``postgresql://user@host:port/dbname``) and PEER_MAIL_DIR (the folder that
receives one file per reset message). The tables must exist already, because
start-up never creates them: ``peer.py seed`` does.
"""

# No "from __future__ import annotations" here: FastAPI resolves the dependency
# annotations at run time, and they name functions local to create_app.
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

from db import DatabaseURLError, User, create_engine
from fastapi import Depends, FastAPI
from fastapi_users import FastAPIUsers
from fastapi_users_db_sqlalchemy import SQLAlchemyUserDatabase
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from users import UserManager, auth_backend


def create_app(database_url: str, mail_dir: Path) -> FastAPI:
    """Build the application, or raise ``DatabaseURLError`` for an unusable URL."""
    engine = create_engine(database_url)
    session_maker = async_sessionmaker(engine, expire_on_commit=False)

    async def get_async_session() -> AsyncIterator[AsyncSession]:
        async with session_maker() as session:
            yield session

    async def get_user_db(
        session: Annotated[AsyncSession, Depends(get_async_session)],
    ) -> AsyncIterator[SQLAlchemyUserDatabase[User, uuid.UUID]]:
        yield SQLAlchemyUserDatabase(session, User)

    async def get_user_manager(
        user_db: Annotated[SQLAlchemyUserDatabase[User, uuid.UUID], Depends(get_user_db)],
    ) -> AsyncIterator[UserManager]:
        yield UserManager(user_db, mail_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    fastapi_users = FastAPIUsers[User, uuid.UUID](get_user_manager, [auth_backend])
    application = FastAPI(lifespan=lifespan)
    application.include_router(
        fastapi_users.get_auth_router(auth_backend), prefix="/auth/jwt", tags=["auth"]
    )
    application.include_router(
        fastapi_users.get_reset_password_router(), prefix="/auth", tags=["auth"]
    )
    return application


def _create_app_from_environment() -> FastAPI:
    database_url = os.environ.get("PEER_DATABASE_URL", "")
    mail_dir = os.environ.get("PEER_MAIL_DIR", "")
    # SystemExit with a message prints that one line and exits with status 1,
    # which uvicorn lets through while it imports this module.
    if not database_url:
        raise SystemExit("error: PEER_DATABASE_URL is not set: set it to the seeded database's URL")
    if not mail_dir:
        raise SystemExit("error: PEER_MAIL_DIR is not set: set it to a folder for the reset mails")
    try:
        Path(mail_dir).mkdir(parents=True, exist_ok=True)
        return create_app(database_url, Path(mail_dir))
    except DatabaseURLError as error:
        raise SystemExit(f"error: PEER_DATABASE_URL is not usable: {error}") from None
    except OSError as error:
        raise SystemExit(
            f"error: cannot create PEER_MAIL_DIR {mail_dir}: {error.strerror}"
        ) from None


app = _create_app_from_environment()
