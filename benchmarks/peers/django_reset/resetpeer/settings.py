"""Settings of the Django peer: a stock ``startproject`` cut down to the reset views.

Each difference from ``startproject`` carries a comment saying why. The
environment supplies ``PEER_DATABASE_URL`` (see ``database_url``) and
``PEER_MAIL_DIR``, the folder the reset mails are written to.
"""

import os
from pathlib import Path

from resetpeer.database_url import parse_database_url

BASE_DIR = Path(__file__).resolve().parent

# A fixed key, because this project only serves a benchmark on 127.0.0.1 and
# the seed command and the server must sign sessions and tokens alike.
SECRET_KEY = "benchmark-only-not-secret-7f3c1e9a2b5d4068a1c2e3f4b5a6c7d8e9f0a1b2"  # noqa: S105

DEBUG = False

ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

# Only what the auth views need: no admin, messages or static files.
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
]

# startproject's list without two entries, and one added. CsrfViewMiddleware
# is removed because the load generator cannot fetch a CSRF token for every
# request, and safereset's JSON API takes none either. LoginView and
# PasswordResetView still check CSRF through their own csrf_protect decorator,
# so skip_csrf_checks turns that check off as well. MessageMiddleware goes
# with the messages app, which the reset views do not use.
MIDDLEWARE = [
    "resetpeer.middleware.skip_csrf_checks",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "resetpeer.urls"

# The admin app usually supplies the registration templates, so this
# project carries its own small ones.
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
            ],
        },
    },
]

DATABASES = {"default": parse_database_url(os.environ.get("PEER_DATABASE_URL", ""))}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Argon2id comes first, with safereset's parameters, and the rest are Django's
# default hashers. Django's own Argon2PasswordHasher is left out because it has the
# same algorithm name and would take over verifying the "argon2$" hashes.
PASSWORD_HASHERS = [
    "resetpeer.hashers.RFC9106LowMemoryArgon2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2PasswordHasher",
    "django.contrib.auth.hashers.PBKDF2SHA1PasswordHasher",
    "django.contrib.auth.hashers.BCryptSHA256PasswordHasher",
    "django.contrib.auth.hashers.ScryptPasswordHasher",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# No route serves "/". The load generator does not follow redirects, so only
# the 302 of a successful login counts.
LOGIN_REDIRECT_URL = "/"

# Reset mails are written as files, one per message, into PEER_MAIL_DIR.
EMAIL_BACKEND = "django.core.mail.backends.filebased.EmailBackend"
EMAIL_FILE_PATH = os.environ.get("PEER_MAIL_DIR")

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# With DEBUG off, Django's default logging prints nothing, not even the
# traceback of a 500. Send errors to standard error so that failures under
# load show up in the server's output.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django": {"handlers": ["stderr"], "level": "ERROR"}},
}
