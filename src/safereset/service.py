"""The use cases of safereset behind one object: ``Service``.

Each concern lives in its own module under ``safereset.usecases``. This class
combines them, so callers (the web layer, the CLI, an embedding application)
need one object over one database.
"""

from __future__ import annotations

from safereset.usecases.base import utc_now
from safereset.usecases.codes import CodeRecovery
from safereset.usecases.intake import Intake
from safereset.usecases.links import LinkRecovery
from safereset.usecases.sessions import Sessions
from safereset.usecases.users import UserAdmin, UserView

__all__ = ["Service", "UserView", "utc_now"]


class Service(UserAdmin, Intake, LinkRecovery, CodeRecovery, Sessions):
    """Every use case, over one database; see each base class for its part."""
