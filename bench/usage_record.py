"""The usage record: what building one costs on the request path, per shape.

What is measured
  The proxy builds one usage record per request (access/proxy/common.py,
  record_usage) from its Call, at ~3,000 requests/s per core. Each shape below is
  built from the same 23 attribute reads of a Call-like object, timeit's best of
  --repeat rounds of --number builds, in ns per build:

    tuple                 the positional 19-field tuple the record replaced, with the
                          4 fields the record added (what it costs to carry them)
    NamedTuple, keywords  monitoring.records.UsageRecord as the proxy builds it
    NamedTuple, positions UsageRecord built positionally (cheaper, but order-coupled)
    dataclass(frozen, slots), keywords
                          the same fields as a frozen dataclass with slots

  and, off the request path, what the writer thread spends per record turning it into
  a row (monitoring.usage._row: codes, timestamp, verification bits).

Usage: python bench/usage_record.py [--number 200000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import timeit
from dataclasses import dataclass, make_dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "stagegate.settings")

import django

django.setup()

from monitoring.records import UsageRecord  # noqa: E402
from monitoring.usage import _row  # noqa: E402

FrozenRecord = make_dataclass(
    "FrozenRecord",
    [(name, UsageRecord.__annotations__[name]) for name in UsageRecord._fields],
    frozen=True,
    slots=True,
)


@dataclass
class Call:
    """The attributes record_usage reads, with a served call's values."""

    wall: float = 1_790_000_000.25
    request_id: str = "req_a1b2c3d4e5f61f3a"
    org: str = "org_abcdefghijklmnop"
    key: str = "key_abcdefghijklmnop"
    tier: str = "research_partner"
    model: str = "atlas-2"
    stage: str = "research_preview"
    endpoint: str = "chat.completions"
    verdict: str = "allow"
    reason: str = "ok"
    status: int = 200
    error: str = ""
    streamed: bool = False
    client_disconnected: bool = False
    flagged: bool = False
    prompt_tokens: int = 120
    completion_tokens: int = 340
    elapsed: float = 412.5
    upstream: float | None = 401.25
    plan_version: int | None = 3
    max_tokens: int | None = 256
    claimed_tier: str = "research_partner"
    verifications: tuple = (("monitoring_agreement", None),)


READS = [
    "c.wall",
    "c.request_id",
    "c.org",
    "c.key",
    "c.tier",
    "c.model",
    "c.stage",
    "c.endpoint",
    "c.verdict",
    "c.reason",
    "c.status",
    "c.error",
    "c.streamed",
    "c.client_disconnected",
    "c.flagged",
    "c.prompt_tokens",
    "c.completion_tokens",
    "c.elapsed",
    "c.upstream",
    "c.plan_version",
    "c.max_tokens",
    "c.claimed_tier",
    "c.verifications",
]
KEYWORDS = ", ".join(
    f"{name}={read}" for name, read in zip(UsageRecord._fields, READS, strict=True)
)
SHAPES = {
    "tuple": f"({', '.join(READS)},)",
    "NamedTuple, keywords": f"UsageRecord({KEYWORDS})",
    "NamedTuple, positions": f"UsageRecord({', '.join(READS)})",
    "dataclass(frozen, slots), keywords": f"FrozenRecord({KEYWORDS})",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    scope = {"c": Call(), "UsageRecord": UsageRecord, "FrozenRecord": FrozenRecord}

    def best_ns(statement: str, number: int) -> float:
        rounds = timeit.repeat(statement, globals=scope, number=number, repeat=args.repeat)
        return min(rounds) / number * 1e9

    print(f"Python {sys.version.split()[0]}; best of {args.repeat} x {args.number:,} builds")
    baseline = best_ns(SHAPES["tuple"], args.number)
    for name, statement in SHAPES.items():
        ns = best_ns(statement, args.number)
        print(f"  {name:<36}{ns:>7.0f} ns  ({ns - baseline:+.0f} ns vs the tuple)")
    scope["record"] = eval(SHAPES["NamedTuple, keywords"], scope)
    scope["_row"] = _row
    print(f"  {'writer thread: _row(record)':<36}{best_ns('_row(record)', args.number):>7.0f} ns")


if __name__ == "__main__":
    main()
