"""Stagegate settings, all read from the environment (see docs/operations.md).

Two modes. ``embedded`` (the default) needs nothing installed: a SQLite file and
a generated secret key under ``var/``, in-process caches. ``production`` requires
``SECRET_KEY``, ``DATABASE_URL`` (PostgreSQL), ``REDIS_URL`` and
``ALLOWED_HOSTS``, and turns on every ``check --deploy`` protection.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from stagegate.env import env_bool, env_choice, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("STAGEGATE_VAR_DIR", str(BASE_DIR / "var")))

MODE = env_choice("STAGEGATE_MODE", "embedded", ("embedded", "production"))
PRODUCTION = MODE == "production"


def _embedded_secret_key() -> str:
    """A random key generated once and kept in var/, so sessions survive restarts."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(64))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY (or SECRET_KEY_FILE) is required in production mode")
    SECRET_KEY = _embedded_secret_key()

DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [] if PRODUCTION else ["127.0.0.1", "localhost"])
if PRODUCTION and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS is required in production mode")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc served from our own static files
    "django_htmx",
    "axes",
    "csp",
    "monitoring",
    "access",
    "rollout",
    "console",
    "tuning",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    # Control characters in /api/ paths and query parameters refused; Django's own
    # 404s there in the API's error shape.
    "stagegate.api.ApiEdgeMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out sign-in into its answer.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "stagegate.urls"
ASGI_APPLICATION = "stagegate.asgi.application"
WSGI_APPLICATION = "stagegate.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "console.context.console",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
    if DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise ImproperlyConfigured("DATABASE_URL must point at PostgreSQL (postgres://...)")
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
elif PRODUCTION:
    raise ImproperlyConfigured("DATABASE_URL is required in production mode")
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": env_str("STAGEGATE_SQLITE_PATH", str(VAR_DIR / "stagegate.sqlite3")),
            # IMMEDIATE takes the write lock at BEGIN, so two writers cannot both read the
            # audit chain's tail before either appends to it.
            # WAL lets the proxy's readers work while a writer commits.
            "OPTIONS": {
                "transaction_mode": "IMMEDIATE",
                "timeout": 20,
                "init_command": "PRAGMA journal_mode=WAL;",
            },
            # A file, not memory, so a server the tests start can share the test database
            # (tests/live.py passes its path); one per test run, so that two runs in one
            # checkout do not delete each other's.
            "TEST": {"NAME": VAR_DIR / f"test-{os.getpid()}.sqlite3"},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Cache: Redis when configured, otherwise in process -----------------------------------
REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": "stagegate",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1},
        }
    }
elif PRODUCTION:
    raise ImproperlyConfigured("REDIS_URL is required in production mode")
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

# --- Auth -------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/console/login/"
LOGIN_REDIRECT_URL = "/console/"
AUTHENTICATION_BACKENDS = [
    # First: refuses a sign-in while its username or address is locked out.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Failed sign-ins throttled per username and, separately, per address (django-axes).
AXES_FAILURE_LIMIT = env_int("STAGEGATE_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = env_float("STAGEGATE_LOGIN_COOLOFF_MINUTES", 15.0, minimum=0.1) / 60  # hours
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "console/locked_out.html"
AXES_VERBOSE = False

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}
# Embedded mode serves static files straight from the apps, no collectstatic needed.
WHITENOISE_USE_FINDERS = not PRODUCTION
# ... and looks each one up when asked, so a stylesheet edited while the server runs is
# served whole (indexed at start-up, a grown file was sent with its old Content-Length).
WHITENOISE_AUTOREFRESH = not PRODUCTION
if not PRODUCTION:
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # WhiteNoise expects it to exist
    STORAGES["staticfiles"] = {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}

# --- Security (check --deploy passes in production mode) --------------------------------
# Only the project's own scripts, styles and images: no CDN, no inline script.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
SESSION_COOKIE_HTTPONLY = True
# No script reads the CSRF cookie: the console and Swagger UI get the token in the page.
CSRF_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
    SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]

# --- REST API -----------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # DRF's, answering 401 with WWW-Authenticate to anonymous callers.
        "access.authentication.SessionAuthentication",
    ],
    # Deny by default: a view that forgets to declare its permissions admits no one.
    "DEFAULT_PERMISSION_CLASSES": ["stagegate.permissions.DenyAll"],
    "DEFAULT_SCHEMA_CLASS": "stagegate.schema.AutoSchema",
    # JSON bodies only (the plan endpoints add YAML): one encoding to validate and
    # document, and form data cannot say null.
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    # Each list view names its ordering: stagegate.api.cursor_pagination.
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.CursorPagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "stagegate.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Stagegate API",
    "DESCRIPTION": "Rollout plans, organizations, verifications, API keys, releases and audit.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI and ReDoc from drf-spectacular-sidecar's static files, never a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    # Request bodies get their own components, which say that a field may not be blank
    # (minLength 1) where the serializer refuses a blank string.
    "COMPONENT_SPLIT_REQUEST": True,
    # Two choice sets share the field name "kind"; each gets its own enum name.
    "ENUM_NAME_OVERRIDES": {
        "VerificationKindEnum": "access.models.VerificationKind",
        "TransitionKindEnum": "rollout.models.TransitionKind",
        "FineTuningJobStatusEnum": "tuning.models.JobStatus",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "stagegate.schema.refused_characters",
    ],
}

# --- Stagegate ------------------------------------------------------------------------------
# Rotated keys keep working this long unless the caller chooses otherwise.
STAGEGATE_ROTATION_GRACE_HOURS = env_int("STAGEGATE_ROTATION_GRACE_HOURS", 24, minimum=0)
# last_used on an API key is written at most this often.
STAGEGATE_KEY_LAST_USED_INTERVAL = env_int("STAGEGATE_KEY_LAST_USED_INTERVAL", 60, minimum=1)

# The inference proxy (access/proxy/). Seconds unless named otherwise.
# How often each worker checks for changes; a revocation or pause lands within this.
STAGEGATE_PROXY_POLL_INTERVAL = env_float("STAGEGATE_PROXY_POLL_INTERVAL", 0.25, minimum=0.01)
# Reload everything this often even when nothing seems to have changed.
STAGEGATE_PROXY_FULL_RELOAD = env_float("STAGEGATE_PROXY_FULL_RELOAD", 60.0, minimum=1.0)
# Fail closed (503) when the database has not answered for this long.
STAGEGATE_PROXY_MAX_STALENESS = env_float("STAGEGATE_PROXY_MAX_STALENESS", 10.0, minimum=0.1)
STAGEGATE_PROXY_MAX_BODY_BYTES = env_int(
    "STAGEGATE_PROXY_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024
)
STAGEGATE_UPSTREAM_CONNECT_TIMEOUT = env_float(
    "STAGEGATE_UPSTREAM_CONNECT_TIMEOUT", 5.0, minimum=0.01
)
# Longest silence between two bytes of an upstream response (not the whole response).
STAGEGATE_UPSTREAM_READ_TIMEOUT = env_float("STAGEGATE_UPSTREAM_READ_TIMEOUT", 120.0, minimum=0.01)
STAGEGATE_UPSTREAM_MAX_CONNECTIONS = env_int("STAGEGATE_UPSTREAM_MAX_CONNECTIONS", 200, minimum=1)
# The rate limiter's Redis connections per worker. Each call holds one for a single
# script round trip; callers beyond this wait up to STAGEGATE_REDIS_POOL_TIMEOUT
# seconds for one (then 503 limits_unavailable) instead of being refused at once.
STAGEGATE_REDIS_MAX_CONNECTIONS = env_int("STAGEGATE_REDIS_MAX_CONNECTIONS", 64, minimum=1)
STAGEGATE_REDIS_POOL_TIMEOUT = env_float("STAGEGATE_REDIS_POOL_TIMEOUT", 2.0, minimum=0.01)
# Sent as "Authorization: Bearer ..." to every upstream; plans never hold secrets.
STAGEGATE_UPSTREAM_API_KEY = env_str("STAGEGATE_UPSTREAM_API_KEY", "")
# Usage events: written every FLUSH seconds or BATCH events, whichever comes first.
STAGEGATE_USAGE_FLUSH_SECONDS = env_float("STAGEGATE_USAGE_FLUSH_SECONDS", 1.0, minimum=0.01)
STAGEGATE_USAGE_BATCH_SIZE = env_int("STAGEGATE_USAGE_BATCH_SIZE", 500, minimum=1)
STAGEGATE_USAGE_MAX_BUFFER = env_int("STAGEGATE_USAGE_MAX_BUFFER", 100_000, minimum=1)
# /metrics answers only "Authorization: Bearer <token>"; unset, it is disabled.
STAGEGATE_METRICS_TOKEN = env_str("STAGEGATE_METRICS_TOKEN", "")

# Slow clients (stagegate/deadlines.py, docs/operations.md), per worker process.
# A request's line and headers must arrive within this of the connection opening or of
# the request's first byte, and its whole body within BODY_TIMEOUT of the first read.
STAGEGATE_HEADER_TIMEOUT = env_float("STAGEGATE_HEADER_TIMEOUT", 10.0, minimum=0.1)
STAGEGATE_BODY_TIMEOUT = env_float("STAGEGATE_BODY_TIMEOUT", 30.0, minimum=0.1)
# Requests on connections beyond this many open ones get 503; the kernel queues up to
# BACKLOG connections not yet accepted.
STAGEGATE_MAX_CONNECTIONS = env_int("STAGEGATE_MAX_CONNECTIONS", 1000, minimum=1)
STAGEGATE_BACKLOG = env_int("STAGEGATE_BACKLOG", 2048, minimum=1)

# --- Background work: Celery on Redis, or the in-process scheduler -------------------------
# The same task functions run on the same schedule (stagegate/schedule.py) either way:
# "celery" needs a worker and beat (README); "in_process" runs them in a thread of the
# web server, which is how the embedded mode works without a broker; "off" runs nothing
# (for servers whose work is done elsewhere, and for tests that drive tasks themselves).
STAGEGATE_SCHEDULER = env_choice(
    "STAGEGATE_SCHEDULER", "celery" if REDIS_URL else "in_process", ("celery", "in_process", "off")
)
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", REDIS_URL or "cache+memory://")
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_TASK_DEFAULT_QUEUE = "stagegate"
# A task is acknowledged when it finishes, so a worker that dies mid-task leaves it for
# another; but a task that kills its worker process is failed, not redelivered, so a
# poison message cannot loop. Every periodic task is idempotent and runs again at its
# next tick anyway.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 1800, minimum=10)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 5
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # An unacknowledged message (its worker was killed outright) is delivered again after
    # this long; longer than any task may run.
    "visibility_timeout": CELERY_TASK_TIME_LIMIT + 600,
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Stage reviews and tripwires (rollout/reviews.py, rollout/tripwires.py). Seconds.
# A periodic review of every active release this often; each new review voids the
# approvals of the one before, so this is a working day or more, not minutes.
STAGEGATE_REVIEW_INTERVAL = env_int("STAGEGATE_REVIEW_INTERVAL", 24 * 3600, minimum=60)
STAGEGATE_TRIPWIRE_INTERVAL = env_int("STAGEGATE_TRIPWIRE_INTERVAL", 60, minimum=1)
STAGEGATE_ROLLUP_INTERVAL = env_int("STAGEGATE_ROLLUP_INTERVAL", 60, minimum=1)
# Seconds between sweeps of fine-tuning jobs with something to do (tuning.runner).
STAGEGATE_FINE_TUNING_SWEEP = env_int("STAGEGATE_FINE_TUNING_SWEEP", 10, minimum=1)
# The largest training file accepted by POST /v1/files, in bytes (the plan's
# fine_tuning.max_bytes then limits each tier).
STAGEGATE_MAX_TRAINING_FILE_BYTES = env_int(
    "STAGEGATE_MAX_TRAINING_FILE_BYTES", 64 * 1024 * 1024, minimum=1024
)
# Telemetry rolled up longer ago than this is stale: no criterion passes on it.
STAGEGATE_TELEMETRY_MAX_STALENESS = env_int(
    "STAGEGATE_TELEMETRY_MAX_STALENESS", 15 * 60, minimum=60
)
# Where automatic actions (tripwires) are announced: a webhook receiving JSON, and/or
# e-mail through Django's e-mail backend (EMAIL_* settings).
STAGEGATE_NOTIFY_WEBHOOK_URL = env_str("STAGEGATE_NOTIFY_WEBHOOK_URL", "")
STAGEGATE_NOTIFY_EMAILS = env_list("STAGEGATE_NOTIFY_EMAILS", [])
# Audit checkpoints (monitoring/checkpoints.py, docs/operations.md): the chain's latest
# seq and hash, published outside the database this often, so that verify_audit
# --checkpoint tells a cut tail or a rewrite from an intact chain. Keep the file (and
# the webhook's receiver) where the database's admins cannot write.
STAGEGATE_AUDIT_CHECKPOINT_INTERVAL = env_int("STAGEGATE_AUDIT_CHECKPOINT_INTERVAL", 300, minimum=1)
STAGEGATE_AUDIT_CHECKPOINT_FILE = Path(
    env_str("STAGEGATE_AUDIT_CHECKPOINT_FILE", str(VAR_DIR / "audit-checkpoints.jsonl"))
)
STAGEGATE_AUDIT_CHECKPOINT_WEBHOOK_URL = env_str("STAGEGATE_AUDIT_CHECKPOINT_WEBHOOK_URL", "")
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "stagegate@localhost")
EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend"
    if PRODUCTION
    else "django.core.mail.backends.console.EmailBackend",
)
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_TIMEOUT = 10

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    # Log lines quote client text and exception messages: no API key's secret in them.
    "filters": {"redact_secrets": {"()": "monitoring.redaction.RedactSecretsFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_secrets"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
