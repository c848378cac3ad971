"""ASGI entry point of the Django peer, ``app``: Django's own ASGI application.

Start it with ``uvicorn app:app --app-dir <this folder>`` and the environment
variables PEER_DATABASE_URL and PEER_MAIL_DIR set (see README.md).
"""

import os
import sys
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parent
SETTINGS_MODULE = "resetpeer.settings"


def _load_application():
    # uvicorn's --app-dir puts this folder on sys.path already. Adding it here
    # keeps the import working when the module is loaded some other way.
    if str(PROJECT_DIR) not in sys.path:
        sys.path.insert(0, str(PROJECT_DIR))

    from resetpeer.database_url import DatabaseUrlError, parse_database_url

    try:
        parse_database_url(os.environ.get("PEER_DATABASE_URL", ""))
    except DatabaseUrlError as error:
        sys.exit(f"django_reset peer: {error}")
    if not os.environ.get("PEER_MAIL_DIR"):
        sys.exit(
            "django_reset peer: PEER_MAIL_DIR is missing. Set it to the folder for the reset mails."
        )

    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


app = _load_application()
