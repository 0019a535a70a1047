"""Screening: what a stage's rules cost a request, in process and through the live proxy.

What is measured
  In process (always), this process pinned to one core: the prompt path the proxy
  takes for a chat request whose stage screens (access.screening: prompt_text, then
  Screen.check, which normalizes the text once per case mode and runs one RE2 set
  over it), in µs per call, best of --repeat rounds of --number calls, on a 2 KB
  prompt that matches no rule (what nearly every request is):

    english     2,048 characters of English prose (ASCII: the fast path)
    non-ascii   2,048 characters of French, German, Russian and Japanese (NFKC,
                case folding of non-ASCII text)
    persian     2,048 characters of Persian with zero-width non-joiners (the path for
                text whose only invisible characters are common ones)

  with no screening (the stage's screen is None: nothing is called), 50 rules and
  1,000 rules. The rules are generated, seeded: keyword rules of one to four phrases
  (one to three words from a vocabulary of weapons, cyber, bio, chemistry, fraud and
  self-harm terms, a few in Cyrillic or with accents), one rule in ten with RE2
  patterns instead (word boundaries, alternations, classes, bounded repeats), every
  action and a dozen categories; they are validated by parse_plan like any plan. Also
  normalize alone (fold=True) and building the screen (compile_screen).

  "of proxy" is the prompt path's µs as a share of the proxy's own CPU per request:
  --proxy-us (default 258: the embedded plain row at concurrency 16 of "Issue 15" in
  docs/performance.md, the lowest there, so the largest share), or with --measure-proxy
  what `bench/proxy.py --upstream nginx --concurrency 1 --quick --json` measures now.
  "throughput" is what that extra CPU costs a saturated worker: 1 - p / (p + s).

  With --live: the proxy itself (python -m stagegate.serve, embedded mode, one worker)
  against bench/proxy.py's nginx upstream, its plan's first stage screening with 0,
  50 and 1,000 rules (the same generated rules, responses off, no classifier) applied
  in turn (every other round in reverse order), --rounds times; wrk (one thread) sends
  the chat request with the English 2 KB prompt, which no rule matches, at each
  --concurrency for --duration seconds after a 1 s warm-up. Before each configuration's
  runs the script waits until the proxy's snapshot has it (a sentinel keyword of that
  configuration is blocked; for 0 rules, the last configuration's is answered).
  Figures: req/s and the proxy's CPU µs per request (from /proc, usage rows written
  inside the window), as bench/proxy.py measures them, and each as a ratio to the
  0-rule run of the same round and concurrency. --pin puts the proxy on the last core
  and nginx, wrk and this process on the others (taskset).

Usage: python bench/screening.py [--number 2000] [--repeat 7] [--proxy-us 258]
                                 [--measure-proxy]
                                 [--live [--concurrency 1,16] [--duration 10] [--rounds 2]
                                         [--pin]]
"""

# The prompts are in several scripts on purpose.
# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from access.screening import compile_screen, normalize, prompt_text  # noqa: E402
from rollout.plan_schema import Screening, parse_plan  # noqa: E402

PLAN = ROOT / "docs" / "examples" / "atlas-2.yaml"
RULE_COUNTS = (0, 50, 1000)
# The proxy's own CPU per plain request, embedded, against nginx: docs/performance.md,
# "Issue 15", concurrency 16 (258 µs; 395 at 1, 277 at 64).
DEFAULT_PROXY_US = 258.0

# --------------------------------------------------------------------------- prompts

ENGLISH = (
    "Please read the following notes from our quarterly planning meeting and write a short"
    " summary for the leadership team. The sales organisation closed the quarter slightly"
    " ahead of plan, mostly thanks to renewals in the northern region, while new business"
    " in the south lagged because two large deals slipped into the next quarter. Customer"
    " churn fell to 3.1 percent after the support team introduced weekly check-ins with"
    " accounts at risk. Engineering shipped the new reporting dashboard two weeks late;"
    " the delay came from a database migration that needed more testing than expected."
    " Marketing wants to move budget from trade shows to online webinars, which produced"
    " twice as many qualified leads per dollar last year. Finance asks every department"
    " to review its travel spending and to submit revised forecasts by the end of next"
    " month. Human resources reminded everyone that the annual engagement survey opens on"
    " Monday and that participation was only 58 percent last time.\n\n"
    "In the summary, list the three most important decisions we need to make, the owner"
    " of each, and any risks you see. Keep it under two hundred words, use plain language,"
    " and avoid jargon. If something in the notes is unclear or contradictory, say so"
    " rather than guessing. Finally, suggest one question we should ask the sales team"
    " about the deals that slipped, and one metric we should add to the dashboard.\n\n"
)
NON_ASCII = (
    "Veuillez résumer le compte rendu suivant : la réunion a porté sur les prévisions"
    " budgétaires, la qualité du service après-vente et le calendrier de livraison. "
    "Bitte fassen Sie außerdem die Rückmeldungen der Kunden zusammen, die über längere"
    " Wartezeiten und fehlerhafte Rechnungen geklagt haben. "
    "Пожалуйста, кратко изложите основные выводы отчёта о выручке за квартал и укажите,"
    " какие отделы превысили бюджет и почему. "
    "最後に、来月の販売目標と新しいダッシュボードの指標について、短くまとめてください。\n"
)
PERSIAN = (
    "لطفاً گزارش زیر را خلاصه کنید. تیم فروش می‌خواهد بودجهٔ نمایشگاه‌ها را به وبینارهای"
    " آنلاین منتقل کند، و واحد مالی از همه می‌خواهد که هزینه‌های سفر را بازبینی کنند."
    " نظرسنجی سالانه از دوشنبه آغاز می‌شود و مشارکت دفعهٔ قبل کم بود.\n"
)


def two_kb(text: str) -> str:
    return (text * (2048 // len(text) + 1))[:2048]


PROMPTS = {"english": two_kb(ENGLISH), "non-ascii": two_kb(NON_ASCII), "persian": two_kb(PERSIAN)}


def chat(prompt: str) -> dict[str, Any]:
    return {
        "model": "atlas-2",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
        "max_tokens": 16,
    }


# --------------------------------------------------------------------------- rules

CATEGORIES = {
    "weapons": "block",
    "explosives": "block",
    "bio": "block",
    "chem": "block",
    "cyber": "route",
    "malware": "route",
    "fraud": "flag",
    "self-harm": "flag",
    "extremism": "flag",
    "harassment": "flag",
    "violence/graphic": "flag",
    "privacy": "flag",
}
STEMS = (
    "nerve agent synthesis", "sarin", "soman", "tabun", "vx precursor", "ricin extraction",
    "anthrax spores", "botulinum toxin", "weaponized pathogen", "gain of function",
    "pipe bomb", "detonator wiring", "tatp", "ammonium nitrate mixture", "thermite charge",
    "ransomware builder", "keylogger", "zero-day exploit", "credential stuffing", "botnet",
    "rootkit", "phishing kit", "sql injection payload", "privilege escalation", "c2 server",
    "card skimmer", "money mule", "fake invoice", "identity theft", "wire fraud script",
    "suicide method", "self harm", "overdose amount", "manifesto", "radicalize",
    "doxxing", "home address of", "stalkerware", "swatting", "gore video",
    "взрывчатка", "оружие массового поражения", "fabrication d'explosifs", "sprengstoff",
)  # fmt: skip
MODIFIERS = (
    "how to make", "step by step", "cheap", "homemade", "undetectable", "buy", "instructions",
    "recipe", "tutorial", "at home", "without getting caught", "for beginners", "advanced",
    "bypass", "mass", "portable", "improvised", "untraceable", "darknet", "kit",
)  # fmt: skip
PATTERNS = (
    r"\b(?:how|steps?) to (?:make|build|synthesi[sz]e) (?:a |an )?{word}\b",
    r"\b{word}\s+(?:recipe|instructions|tutorial|guide)\b",
    r"\b(?:buy|order|source)\s+\w+\s+{word}\b",
    r"\b{word}[-_ ]?v?\d{{1,3}}\b",
    r"\b\d{{3}}-\d{{2}}-\d{{4}}\b.{{0,40}}\b{word}\b",
)


def generate_rules(count: int, *, seed: int = 16, sentinel: str | None = None) -> list[dict]:
    """``count`` rules (the sentinel's block rule, when given, among them), seeded."""
    rng = random.Random(seed)
    categories = list(CATEGORIES)
    rules: list[dict[str, Any]] = []
    if sentinel:
        rules.append({"category": "bench", "action": "block", "keywords": [sentinel]})
    while len(rules) < count:
        index = len(rules)
        category = categories[index % len(categories)]
        action = CATEGORIES[category]
        rule: dict[str, Any] = {"category": category, "action": action}
        if action == "route":
            rule["route_to"] = "atlas-2-mini"
        word = f"{rng.choice(STEMS).split()[0]}{index}"
        if index % 10 == 9:
            rule["patterns"] = [
                pattern.format(word=word) for pattern in rng.sample(PATTERNS, rng.randint(1, 2))
            ]
        else:
            rule["keywords"] = sorted(
                {
                    f"{rng.choice(MODIFIERS)} {rng.choice(STEMS)} {index}"
                    if rng.random() < 0.7
                    else f"{rng.choice(STEMS)} {word}"
                    for _ in range(rng.randint(1, 4))
                }
            )
        rules.append(rule)
    return rules


def screening_of(rules: list[dict]) -> Screening | None:
    """The rules validated as a plan's stage screening (parse_plan, like any plan)."""
    if not rules:
        return None
    plan = yaml.safe_load(PLAN.read_text())
    plan["stages"][0]["screening"] = {"rules": rules}
    return parse_plan(plan).stages[0].screening


# --------------------------------------------------------------------------- in process


def per_call_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    fn()
    gc.collect()
    return 1e6 * min(timeit.repeat(fn, number=number, repeat=repeat)) / number


def measured_proxy_us() -> float:
    """The proxy's CPU per plain request now: bench/proxy.py against nginx, concurrency 1."""
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "proxy.json"
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "proxy.py"),
                "--upstream",
                "nginx",
                "--concurrency",
                "1",
                "--quick",
                "--json",
                str(out),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        runs = json.loads(out.read_text())["runs"]
    [run] = [r for r in runs if r["target"] == "stagegate" and r["mode"] == "plain"]
    return run["proxy_us_per_request"]


def in_process(args: argparse.Namespace, proxy_us: float, source: str) -> None:
    cores = os.sched_getaffinity(0)
    with contextlib.suppress(AttributeError, OSError):  # not every OS can pin
        os.sched_setaffinity(0, {max(cores)})
    try:
        _in_process(args, proxy_us, source)
    finally:
        os.sched_setaffinity(0, cores)  # --live's processes choose their own


def _in_process(args: argparse.Namespace, proxy_us: float, source: str) -> None:
    screens = {}
    for count in RULE_COUNTS:
        screening = screening_of(generate_rules(count))
        started = time.perf_counter()
        screens[count] = compile_screen(screening)
        built_ms = 1e3 * (time.perf_counter() - started)
        if count:
            print(f"{count:>5} rules: compile_screen {built_ms:.1f} ms")
    print()
    print(
        f"in process, one core: µs per call, best of {args.repeat} x {args.number};"
        f" of proxy = share of {proxy_us:.0f} µs ({source})"
    )
    print(
        f"{'prompt':<11}{'rules':>6}{'µs/call':>9}{'of proxy':>10}{'throughput':>12}"
        f"{'normalize':>11}{'verdict':>9}"
    )
    for name, prompt in PROMPTS.items():
        document = chat(prompt)
        normalize_us = per_call_us(
            lambda p=prompt: normalize(p, fold=True), args.number, args.repeat
        )
        for count, screen in screens.items():
            if screen is None:
                us, verdict = 0.0, "-"  # the proxy skips screening when the stage has none
            else:

                def path(document=document, screen=screen) -> object:
                    return screen.check(prompt_text("chat.completions", document))

                us = per_call_us(path, args.number, args.repeat)
                verdict = screen.check(prompt_text("chat.completions", document)).action
            share = us / proxy_us
            loss = 1 - proxy_us / (proxy_us + us)
            print(
                f"{name:<11}{count:>6}{us:>9.1f}{share:>10.1%}{-loss:>12.1%}"
                f"{normalize_us:>11.1f}{verdict:>9}",
                flush=True,
            )


# --------------------------------------------------------------------------- live


def live(args: argparse.Namespace) -> None:
    """0 / 50 / 1,000 rules through the proxy against nginx (module docstring)."""
    import proxy as proxy_bench  # bench/proxy.py
    from loadgen import Server

    var_dir = tempfile.mkdtemp(prefix="stagegate-bench-screening-")
    proxy_bench.configure(var_dir, None)
    import django

    django.setup()
    from rollout.plans import apply_plan

    # bench/proxy.py's requests carry its MESSAGES: the 2 KB English prompt here.
    proxy_bench.MESSAGES = chat(PROMPTS["english"])["messages"]
    layout = proxy_bench.Layout.pinned(1) if args.pin else proxy_bench.Layout()
    if layout.rest:
        os.sched_setaffinity(0, set(layout.rest))
    servers: list[Server] = []
    try:
        rest = layout.prefix(layout.rest)
        upstream, upstream_base = proxy_bench.start_nginx_upstream(var_dir, rest)
        servers.append(upstream)
        raw_key = proxy_bench.seed(f"{upstream_base}/v1")
        proxy, proxy_base = proxy_bench.start_proxy(var_dir, 1, layout)
        servers.append(proxy)
        target = proxy_bench.Target(
            "stagegate",
            f"{proxy_base}/v1/chat/completions",
            proxy_bench.RELEASE,
            {"authorization": f"Bearer {raw_key}"},
            proxy,
        )
        running = proxy_bench.Servers(proxy, upstream)
        run_args = argparse.Namespace(
            load="wrk", var_dir=var_dir, layout=layout, duration=args.duration
        )
        base_plan = yaml.safe_load(proxy_bench.bench_plan(f"{upstream_base}/v1"))
        results: list[tuple[int, int, int, float, float]] = []
        last_sentinel = None
        for round_ in range(1, args.rounds + 1):
            # Every other round in reverse, so that no configuration always runs last (the
            # usage table grows as the runs go, and each row costs a little more).
            for count in RULE_COUNTS if round_ % 2 else RULE_COUNTS[::-1]:
                sentinel = f"benchsentinel{count}x{round_}"
                plan = copy.deepcopy(base_plan)
                rules = generate_rules(count, sentinel=sentinel) if count else []
                plan["stages"][0].pop("screening", None)
                if rules:
                    plan["stages"][0]["screening"] = {"rules": rules}
                apply_plan(yaml.safe_dump(plan), actor=proxy_bench.ACTOR, comment="screening")
                running.proxy_calls += asyncio.run(
                    picked_up(target, sentinel)
                    if count
                    else picked_up(target, last_sentinel, blocked=False)
                )
                last_sentinel = sentinel if count else None
                for concurrency in args.concurrency:
                    run = asyncio.run(
                        proxy_bench.measure(target, "plain", concurrency, run_args, running)
                    )
                    if run.errors:
                        print(f"  errors: {dict(run.errors)}")
                    us = run.us_per_request(run.proxy_cpu_s)
                    results.append((round_, count, concurrency, run.load.rps, us))
                    print(
                        f"  round {round_} {count:>5} rules c={concurrency:<3}"
                        f"{run.load.rps:>9,.0f} req/s{us:>7.0f} µs/req",
                        flush=True,
                    )
    finally:
        for server in reversed(servers):
            server.stop(15)
    print()
    print("through the proxy (nginx upstream, 2 KB English prompt, plain):")
    print(
        f"{'round':>5}{'rules':>6}{'conc':>5}{'req/s':>9}{'vs 0':>7}{'proxy µs/req':>14}{'vs 0':>7}"
    )
    base = {(r, c): (rps, us) for r, n, c, rps, us in results if n == 0}
    for round_, count, concurrency, rps, us in results:
        rps0, us0 = base[(round_, concurrency)]
        print(
            f"{round_:>5}{count:>6}{concurrency:>5}{rps:>9,.0f}{rps / rps0:>7.2f}"
            f"{us:>14.0f}{us / us0:>7.2f}"
        )
    if args.rounds > 1:
        print("medians over rounds:")
        for count in RULE_COUNTS:
            for concurrency in args.concurrency:
                rows = [(r[3], r[4]) for r in results if r[1] == count and r[2] == concurrency]
                rows0 = [(r[3], r[4]) for r in results if r[1] == 0 and r[2] == concurrency]
                rps = statistics.median(x for x, _ in rows)
                us = statistics.median(y for _, y in rows)
                rps0 = statistics.median(x for x, _ in rows0)
                us0 = statistics.median(y for _, y in rows0)
                print(
                    f"{'':>5}{count:>6}{concurrency:>5}{rps:>9,.0f}{rps / rps0:>7.2f}"
                    f"{us:>14.0f}{us / us0:>7.2f}"
                )


async def picked_up(target: Any, sentinel: str | None, *, blocked: bool = True) -> int:
    """Send ``sentinel`` until the proxy's snapshot has the plan just applied: until it is
    blocked (400) when it is this plan's, answered (200) when ``blocked`` is false (the
    plan screens nothing; the sentinel is the last plan's). How many calls that took
    (each is a usage row)."""
    import aiohttp
    import orjson

    if sentinel is None:
        return 0  # nothing screened before either
    body = orjson.dumps(
        {"model": target.model, "messages": [{"role": "user", "content": f"say {sentinel}"}]}
    )
    headers = {"content-type": "application/json", **target.headers}
    calls = 0
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as session:
        while True:
            calls += 1
            async with session.post(target.url, data=body, headers=headers) as response:
                await response.read()
                if response.status == (400 if blocked else 200):
                    return calls
            if time.monotonic() > deadline:
                raise SystemExit(
                    "the proxy did not apply the plan's screening in 30 s (is screening wired"
                    " into access/proxy?)"
                )
            await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per round (2000)")
    parser.add_argument("--repeat", type=int, default=7, help="rounds; the best counts (7)")
    parser.add_argument(
        "--proxy-us",
        type=float,
        default=DEFAULT_PROXY_US,
        help=f"the proxy's CPU per request to compare with (default {DEFAULT_PROXY_US:.0f}:"
        " docs/performance.md, issue 15, embedded plain, concurrency 16)",
    )
    parser.add_argument(
        "--measure-proxy",
        action="store_true",
        help="measure it instead: bench/proxy.py --upstream nginx --concurrency 1 --quick",
    )
    parser.add_argument("--live", action="store_true", help="also run through the live proxy")
    parser.add_argument(
        "--concurrency",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[1, 16],
        help="--live: comma-separated levels (1,16)",
    )
    parser.add_argument("--duration", type=int, default=10, help="--live: seconds per run (10)")
    parser.add_argument("--rounds", type=int, default=2, help="--live: rounds of 0/50/1000 (2)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="--live: the proxy on a core of its own (taskset), the rest on the others",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(
        f"Stagegate screening | Python {sys.version.split()[0]} | os.cpu_count() ="
        f" {os.cpu_count()} | load average {os.getloadavg()[0]:.2f}"
    )
    if args.measure_proxy:
        proxy_us, source = measured_proxy_us(), "bench/proxy.py --upstream nginx, c=1, now"
    else:
        proxy_us, source = args.proxy_us, "--proxy-us"
        if args.proxy_us == DEFAULT_PROXY_US:
            source = "docs/performance.md, issue 15, embedded plain c=16"
    in_process(args, proxy_us, source)
    if args.live:
        print()
        live(args)


if __name__ == "__main__":
    main()
