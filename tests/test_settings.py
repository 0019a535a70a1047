"""Settings come from the environment and fail loudly; production passes check --deploy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCTION_ENV = {
    "STAGEGATE_MODE": "production",
    "SECRET_KEY": "k7#Qz!v9@Lr2$Wm5^Tn8&Yp3*Hs6(Bx1)Fd4_Gj0+Ck-Ue=Ia[Ob]Pc{Rd}Se|Tf;Ug",
    "DATABASE_URL": "postgres://stagegate@db.internal:5432/stagegate",
    "REDIS_URL": "redis://cache.internal:6379/0",
    "ALLOWED_HOSTS": "stagegate.example.org",
}


def _manage(*args: str, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    base |= {"STAGEGATE_VAR_DIR": str(tmp_path), **env}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_production_settings_pass_check_deploy(tmp_path):
    result = _manage(
        "check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION_ENV, tmp_path=tmp_path
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "no issues" in result.stdout


@pytest.mark.parametrize("missing", ["SECRET_KEY", "DATABASE_URL", "REDIS_URL", "ALLOWED_HOSTS"])
def test_production_refuses_to_start_without_required_setting(tmp_path, missing):
    env = {k: v for k, v in PRODUCTION_ENV.items() if k != missing}
    result = _manage("check", env=env, tmp_path=tmp_path)
    assert result.returncode != 0
    assert f"{missing}" in result.stderr and "required in production" in result.stderr


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DEBUG", "maybe", "DEBUG='maybe' is not a boolean"),
        ("STAGEGATE_MODE", "staging", "STAGEGATE_MODE='staging' must be one of"),
        ("STAGEGATE_ROTATION_GRACE_HOURS", "soon", "is not an integer"),
        ("STAGEGATE_HEADER_TIMEOUT", "0", "STAGEGATE_HEADER_TIMEOUT=0.0 is below the minimum"),
        ("STAGEGATE_MAX_CONNECTIONS", "lots", "STAGEGATE_MAX_CONNECTIONS='lots' is not an integer"),
        ("DATABASE_URL", "mysql://x@localhost/db", "must point at PostgreSQL"),
    ],
)
def test_bad_setting_fails_loudly(tmp_path, name, value, message):
    result = _manage("check", env={name: value}, tmp_path=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr


def test_embedded_mode_generates_and_keeps_a_secret_key(tmp_path):
    first = _manage(
        "shell",
        "-c",
        "from django.conf import settings; print(settings.SECRET_KEY)",
        env={},
        tmp_path=tmp_path,
    )
    second = _manage(
        "shell",
        "-c",
        "from django.conf import settings; print(settings.SECRET_KEY)",
        env={},
        tmp_path=tmp_path,
    )
    key = first.stdout.strip().splitlines()[-1]
    assert len(key) >= 50
    assert second.stdout.strip().splitlines()[-1] == key
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_cache_is_redis_when_configured_and_in_process_otherwise():
    from django.conf import settings
    from django.core.cache import cache

    backend = settings.CACHES["default"]["BACKEND"]
    if os.environ.get("REDIS_URL"):
        assert backend == "django_redis.cache.RedisCache"
        from django_redis import get_redis_connection

        get_redis_connection("default").ping()
    else:
        assert backend == "django.core.cache.backends.locmem.LocMemCache"
    cache.set("stagegate:test", {"v": 1}, timeout=5)
    assert cache.get("stagegate:test") == {"v": 1}
