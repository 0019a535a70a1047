"""API key checks: what a refusal costs with and without touching storage.

Prints, for one core, operations per second and microseconds per operation of:
  db_lookup      authenticate_key() on a valid key (parse, one indexed SELECT, digest)
  db_miss        authenticate_key() on a well-formed key that does not exist
  checksum_fail  authenticate_key() on a mistyped key (refused before any query)
  malformed      authenticate_key() on text that is not a key at all
and each one's speed as a ratio to db_lookup, measured in the same run.

Usage: python bench/keys.py [--seconds 2]   (embedded SQLite in a temporary
directory unless DATABASE_URL is set)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")
if not os.environ.get("DATABASE_URL"):
    os.environ["STAGEGATE_VAR_DIR"] = tempfile.mkdtemp(prefix="stagegate-bench-")

import django

django.setup()

from django.core.management import call_command  # noqa: E402

from access import keys  # noqa: E402
from access.models import Organization  # noqa: E402


def rate(fn, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(200):
        fn()
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(100):
            fn()
        calls += 100
    return calls / (time.perf_counter() - start)


def refused(raw_key: str):
    def check():
        try:
            keys.authenticate_key(raw_key)
        except keys.KeyRefused:
            return
        raise AssertionError("expected a refusal")

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = parser.parse_args()

    call_command("migrate", verbosity=0)
    org, _ = Organization.objects.get_or_create(slug="bench-org", defaults={"name": "Bench"})
    issued = keys.issue_key(organization=org, name="bench", actor="system:bench")
    valid = issued.raw_key
    missing, _ = keys.generate_key()
    mistyped = valid[:-10] + ("A" if valid[-10] != "A" else "B") + valid[-9:]

    cases = {
        "db_lookup": lambda: keys.authenticate_key(valid),
        "db_miss": refused(missing),
        "checksum_fail": refused(mistyped),
        "malformed": refused("sk-not-a-stagegate-key"),
    }
    vendor = django.db.connection.vendor
    print(f"API key checks, one core, {vendor} ({args.seconds:.1f} s per case)")
    print(f"{'case':<15}{'ops/s':>12}{'µs/op':>10}{'x db_lookup':>14}")
    baseline = None
    for name, fn in cases.items():
        ops = rate(fn, args.seconds)
        baseline = baseline or ops
        print(f"{name:<15}{ops:>12,.0f}{1e6 / ops:>10.1f}{ops / baseline:>14.1f}")


if __name__ == "__main__":
    main()
