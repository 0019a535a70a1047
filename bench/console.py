"""Console pages: what the board, the release page and the usage page cost to render at
10^5 and 10^7 usage events.

What is measured
  A throwaway PostgreSQL database is created for the run on the server --postgres
  names (and dropped afterwards). For each size, bench/reviews.py's loader writes the
  synthetic events with COPY (1 release, 2 stages, 4 tiers, 40 orgs, about 5% denied,
  1% upstream errors, 1% flagged) spread over the 7 days before now, and
  ``rollup_pending`` rolls them up; the number of rollup rows therefore barely grows
  with the size (hours x orgs, plus minute rows), while the events grow 100-fold.
  atlas-2 is on docs/examples/atlas-2.yaml, in research_preview since the week began.

  Each page is rendered --renders times (after 3 warm-up renders) with the Django test
  client, signed in as a viewer (force_login), in this process: the whole request
  (middleware, session, guards, the page's queries, its templates and SVG charts)
  without a network or a server in between.

    board           GET /console/
    release         GET /console/releases/atlas-2/
    usage 7d tier   GET /console/usage/                       (the last 7 days, hour bars)
    usage 30d org   GET /console/usage/?range=30d&group_by=org (day bars, totals per org)

How to read the output
  median, p95   render time in ms over the timed renders (wall clock)
  cpu ms        this process's CPU time per render (median): Python, templates, charts;
                less disturbed than wall time by other work on the machine
  db ms         wall time inside SQL statements per render (median): PostgreSQL's part
  queries       SQL queries per render
  raw           queries per render that mention the usage event table (should be 0:
                pages read the rollups only)
  ratios        largest size / smallest, of the median, cpu and db figures: about 1
                means the page's cost does not grow with the events

Usage: python bench/console.py [--sizes 100000,10000000] [--renders 30]
                               [--postgres postgres://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent

PAGES = {
    "board": "/console/",
    "release": "/console/releases/atlas-2/",
    "usage 7d tier": "/console/usage/",
    "usage 30d org": "/console/usage/?range=30d&group_by=org",
}


@contextlib.contextmanager
def throwaway_database(server_url: str):
    """A new, empty PostgreSQL database on ``server_url`` for this run; its URL. Dropped
    afterwards."""
    import psycopg

    name = f"stagegate_bench_console_{os.getpid()}"
    try:
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise SystemExit(f"bench/console.py needs PostgreSQL ({server_url}): {exc}") from None
    try:
        yield f"{server_url}/{name}"
    finally:
        from django.db import connections

        connections.close_all()
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Figures:
    median: float  # wall ms per render
    p95: float
    cpu: float  # this process's CPU ms per render (median)
    db: float  # wall ms inside SQL statements per render (median)
    queries: int
    raw: int  # queries that mention the usage event table


def measure(client, url: str, renders: int) -> Figures:
    """``renders`` timed renders of ``url`` after 3 warm-up ones."""
    from django.db import connection

    for _ in range(3):
        answer = client.get(url)
        if answer.status_code != 200:
            raise SystemExit(f"{url}: {answer.status_code}")
    statements: list[str] = []
    in_sql = [0.0]

    def spy(execute, sql, params, many, context):
        statements.append(sql)
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            in_sql[0] += time.perf_counter() - started

    walls, cpus, dbs = [], [], []
    with connection.execute_wrapper(spy):
        for _ in range(renders):
            statements.clear()
            in_sql[0] = 0.0
            started, cpu_started = time.perf_counter(), time.process_time()
            client.get(url)
            walls.append((time.perf_counter() - started) * 1000)
            cpus.append((time.process_time() - cpu_started) * 1000)
            dbs.append(in_sql[0] * 1000)
    return Figures(
        median=statistics.median(walls),
        p95=percentile(walls, 0.95),
        cpu=statistics.median(cpus),
        db=statistics.median(dbs),
        queries=len(statements),
        raw=sum("monitoring_usageevent" in sql for sql in statements),
    )


def run(sizes: list[int], renders: int) -> None:
    sys.path.insert(0, str(BENCH))
    import reviews  # bench/reviews.py: its loader, on the DATABASE_URL set by main()
    from django.conf import settings
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from monitoring import rollups
    from monitoring.models import UsageRollup
    from rollout.models import Release
    from rollout.plans import apply_plan
    from stagegate.roles import VIEWER

    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "testserver"]
    # The events end at the current minute, so the usage page's last 7 days and the
    # release's tripwire windows (the minutes before now) read them.
    end = rollups._floor(datetime.now(UTC), rollups.MINUTE)
    reviews.START, reviews.END = end - timedelta(days=reviews.DAYS), end

    call_command("migrate", verbosity=0)
    apply_plan(reviews.EXAMPLE_PLAN.read_text(), actor="bench")
    Release.objects.filter(name=reviews.RELEASE).update(
        current_stage=reviews.STAGES[0],
        state="active",
        stage_entered_at=reviews.START + timedelta(minutes=25),
    )
    viewer = User.objects.create_user("bench-viewer")
    viewer.groups.add(Group.objects.get_or_create(name=VIEWER)[0])
    client = Client()
    client.force_login(viewer)

    version = connection.cursor().connection.info.server_version
    print(
        f"Console pages, PostgreSQL {version // 10000}.{version % 10000}:"
        f" {reviews.RELEASE}, events over the {reviews.DAYS} days to {end:%Y-%m-%d %H:%M} UTC;"
        f" median and p95 of {renders} renders, Django test client, one viewer"
    )
    print(
        f"{'events':>11}{'rollup rows':>13}  {'page':<15}{'median ms':>10}{'p95 ms':>9}"
        f"{'cpu ms':>8}{'db ms':>7}{'queries':>9}{'raw':>5}"
    )
    found: dict[str, list[Figures]] = {name: [] for name in PAGES}
    for count in sizes:
        reviews.truncate()
        reviews.load(count)
        rollups.rollup_pending(now=end)
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {UsageRollup._meta.db_table}")
        rows = UsageRollup.objects.count()
        for name, url in PAGES.items():
            f = measure(client, url, renders)
            found[name].append(f)
            print(
                f"{count:>11,}{rows:>13,}  {name:<15}{f.median:>10.1f}{f.p95:>9.1f}"
                f"{f.cpu:>8.1f}{f.db:>7.1f}{f.queries:>9}{f.raw:>5}",
                flush=True,
            )
    if len(sizes) > 1:
        print(f"ratios, {sizes[-1]:,} / {sizes[0]:,} events:  median    cpu     db")
        for name, figures in found.items():
            first, last = figures[0], figures[-1]
            print(
                f"  {name:<15}{'':>21}{last.median / first.median:>6.2f}"
                f"{last.cpu / first.cpu:>7.2f}{last.db / first.db:>7.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,10000000", help="numbers of events")
    parser.add_argument("--renders", type=int, default=30, help="timed renders per page")
    parser.add_argument(
        "--postgres",
        default="postgres://postgres@127.0.0.1:5432",
        help="the PostgreSQL server the throwaway database is created on",
    )
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with (
        tempfile.TemporaryDirectory(prefix="stagegate-bench-console-") as var_dir,
        throwaway_database(args.postgres) as url,
    ):
        os.environ["DATABASE_URL"] = url
        os.environ["STAGEGATE_VAR_DIR"] = var_dir
        os.environ.pop("REDIS_URL", None)  # limits and caches in process
        os.environ["STAGEGATE_MODE"] = "embedded"
        run(sizes, args.renders)


if __name__ == "__main__":
    main()
