"""The demo as ``make run`` serves it: the demo model on a port of one's choosing, a
taken port refused, and the demo traffic generator's requests becoming usage events."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from datetime import timedelta

import openai
import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone

from access.models import ApiKey
from monitoring.models import AuditEvent, UsageEvent
from monitoring.rollups import rollup_pending
from rollout.demo import follow_demo_upstream
from rollout.models import Release
from rollout.plans import plan_doc
from stagegate.demo_traffic import (
    BLOCKED_PROMPTS,
    FLAGGED_PROMPTS,
    MIX,
    ROUTED_PROMPTS,
    DemoTraffic,
)
from tests.factories import EXAMPLE_PLAN
from tests.live import ROOT, ProxyServer, free_port, wait_until

SERVE = (sys.executable, "-m", "stagegate.serve")
KEY_LINE = re.compile(r"^\s+(\S+)\s+(\S+)\s+(sgk_\S+)$", re.MULTILINE)


def test_a_taken_demo_port_stops_serve_with_a_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*SERVE, "--port", str(free_port()), "--demo-upstream", "--demo-port", str(port)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert f"the demo model's port 127.0.0.1:{port} is not free" in result.stderr
    assert "Stagegate on" not in result.stdout


def test_demo_traffic_needs_the_demo_upstream():
    result = subprocess.run(
        [*SERVE, "--demo-traffic"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--demo-traffic needs --demo-upstream" in result.stderr


@pytest.mark.django_db
def test_follow_demo_upstream_repoints_only_the_demo_releases(ada):
    from rollout.plans import apply_plan

    apply_plan(EXAMPLE_PLAN.read_text(), actor=ada)  # http://127.0.0.1:8001/v1, atlas-2-2026-11
    other = EXAMPLE_PLAN.read_text().replace("release: atlas-2", "release: local-llm")
    apply_plan(other.replace("atlas-2-2026-11", "llama-local"), actor=ada)
    assert follow_demo_upstream("http://127.0.0.1:9001/v1", ["atlas-2-2026-11"]) == ["atlas-2"]
    assert Release.objects.get(name="atlas-2").upstream_base_url == "http://127.0.0.1:9001/v1"
    assert Release.objects.get(name="atlas-2").active_plan.version == 2
    assert Release.objects.get(name="local-llm").upstream_base_url == "http://127.0.0.1:8001/v1"
    # The classifier on the demo server moves with it; another release's stays.
    assert _classifier_urls("atlas-2") == ["http://127.0.0.1:9001/v1/moderations"] * 4
    assert _classifier_urls("local-llm") == ["http://127.0.0.1:8001/v1/moderations"] * 4
    assert follow_demo_upstream("http://127.0.0.1:9001/v1", ["atlas-2-2026-11"]) == []
    applied = AuditEvent.objects.filter(action="plan.applied", actor="system:serve")
    assert applied.count() == 1


def _classifier_urls(release: str) -> list[str]:
    stages = plan_doc(Release.objects.get(name=release).active_plan).stages
    return [stage.screening.classifier.url for stage in stages]


def test_the_traffic_mix_asks_for_every_kind_of_answer():
    keys = {
        "northwind-research": {"tier": "research_partner", "key": "sgk_partner"},
        "acme-commercial": {"tier": "verified_commercial", "key": "sgk_other"},
    }
    traffic = DemoTraffic("http://127.0.0.1:1", keys, seed=1)
    requests = {scenario: traffic.request(scenario) for scenario, _ in MIX}
    assert requests["chat"][:2] == ("/v1/chat/completions", "sgk_partner")
    assert requests["stream"][2]["stream"] is True
    assert requests["embeddings"][0] == "/v1/embeddings"
    assert requests["not_admitted"][1] == "sgk_other"
    assert requests["unknown_key"][1].startswith("sgk_demotraffic")
    assert requests["unknown_model"][2]["model"] == "atlas-3"
    assert requests["too_large"][2]["max_tokens"] > 4096
    assert "[demo:error]" in requests["upstream_error"][2]["messages"][0]["content"]
    assert "[demo:flag]" in requests["flag"][2]["messages"][0]["content"]
    for scenario, prompts in (
        ("screening_flag", FLAGGED_PROMPTS),
        ("screening_block", BLOCKED_PROMPTS),
        ("screening_route", ROUTED_PROMPTS),
    ):
        assert requests[scenario][:2] == ("/v1/chat/completions", "sgk_partner")
        assert requests[scenario][2]["messages"][0]["content"] in prompts


def test_make_run_on_another_demo_port_serves_the_model_and_demo_traffic(
    live_db, settings, tmp_path
):
    settings.VAR_DIR = tmp_path
    out = io.StringIO()
    call_command("seed_demo", "--no-history", stdout=out)  # the plan says port 8001
    keys = {slug: key for slug, _tier, key in KEY_LINE.findall(out.getvalue())}
    demo_port = free_port()
    server = ProxyServer(
        env={"STAGEGATE_VAR_DIR": str(tmp_path)},
        args=[
            *("--demo-upstream", "--demo-port", str(demo_port)),
            "--demo-traffic-interval",
            "0.05",
        ],
    )
    try:
        release = Release.objects.get(name="atlas-2")
        assert release.upstream_base_url == f"http://127.0.0.1:{demo_port}/v1"
        client = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=keys["northwind-research"], max_retries=0
        )
        reply = client.chat.completions.create(
            model="atlas-2", messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.usage.completion_tokens == 8
        traffic_keys = json.loads((tmp_path / "demo-traffic-keys.json").read_text())
        traffic_ids = set(
            ApiKey.objects.filter(name="demo-traffic").values_list("public_id", flat=True)
        )
        assert len(traffic_ids) == len(traffic_keys)

        def enough():
            events = UsageEvent.objects.filter(key__in=traffic_ids)
            reasons = set(events.values_list("reason", flat=True))
            return events.filter(status=200).exists() and "model_not_available" in reasons

        wait_until(enough, timeout=30, what="demo traffic to become usage events", interval=0.2)
    except BaseException:
        print(server.process.output())
        raise
    finally:
        server.stop()
    assert "demo traffic: one request every 0.05 s" in server.process.output()


def test_a_fresh_demo_flags_blocks_and_routes_what_its_plan_screens(
    live_db, settings, tmp_path, client
):
    """``make run`` on a fresh machine, on another demo port: the demo traffic's screened
    prompts are blocked (by a rule, and by the demo model's classifier, which followed
    the port), flagged and routed to atlas-2-mini, and the console shows it."""
    settings.VAR_DIR = tmp_path
    out = io.StringIO()
    call_command("seed_demo", "--no-history", stdout=out)
    keys = {slug: key for slug, _tier, key in KEY_LINE.findall(out.getvalue())}
    server = ProxyServer(
        env={"STAGEGATE_VAR_DIR": str(tmp_path)},
        args=["--demo-upstream", "--demo-port", str(free_port()), "--no-demo-traffic"],
    )
    try:
        proxy = openai.OpenAI(
            base_url=f"{server.url}/v1", api_key=keys["northwind-research"], max_retries=0
        )

        def ask(prompt: str):
            messages = [{"role": "user", "content": prompt}]
            return proxy.chat.completions.with_raw_response.create(
                model="atlas-2", messages=messages, max_tokens=8
            )

        refusals = []
        for prompt in BLOCKED_PROMPTS:
            with pytest.raises(openai.BadRequestError) as refused:
                ask(prompt)
            refusals.append((refused.value.code, refused.value.body["category"]))
        assert refusals == [("content_blocked", "weapons"), ("content_blocked", "violence/graphic")]
        flagged = [ask(prompt) for prompt in FLAGGED_PROMPTS]
        assert [answer.headers.get("x-stagegate-screening") for answer in flagged] == ["flag"] * 3
        routed = ask(ROUTED_PROMPTS[0])
        assert routed.headers["x-stagegate-routed-to"] == "atlas-2-mini"
        assert routed.parse().usage.completion_tokens == 8
        key = ApiKey.objects.get(name="demo", organization__slug="northwind-research").public_id
        screened = UsageEvent.objects.filter(key=key).exclude(flags="")
        events = wait_until(
            lambda: rows if len(rows := list(screened.all())) == 6 else None,
            timeout=10,
            what="six screened usage events",
        )
    except BaseException:
        print(server.process.output())
        raise
    finally:
        server.stop()
    assert sorted((e.flags, e.reason, e.routed_to) for e in events) == [
        ("bio", "ok", ""),
        ("cyber", "ok", "atlas-2-mini"),
        ("harassment", "ok", ""),
        ("self-harm", "ok", ""),
        ("violence/graphic", "content_blocked", ""),
        ("weapons", "content_blocked", ""),
    ]
    # The release page counts whole minutes only: wait for the last request's to end.
    last_minute = max(event.created_at for event in events).replace(second=0, microsecond=0)
    wait_until(
        lambda: timezone.now() >= last_minute + timedelta(minutes=1),
        timeout=65,
        what="the minute of the last request to end",
        interval=0.5,
    )
    rollup_pending()
    client.force_login(User.objects.get(username="admin"))
    page = client.get("/console/releases/atlas-2/").content.decode()
    rows = re.findall(
        r'<tr id="category-[^"]+"><th scope="row">([^<]+)</th><td>(\d+)</td>'
        r"<td>[^<]*</td><td>[^<]*</td><td>(\d+)</td></tr>",
        page,
    )
    counted = {category: (int(flagged), int(denied)) for category, flagged, denied in rows}
    assert {category: n for category, n in counted.items() if n != (0, 0)} == {
        "bio": (1, 0),
        "cyber": (1, 0),
        "harassment": (1, 0),
        "self-harm": (1, 0),
        "violence/graphic": (0, 1),
        "weapons": (0, 1),
    }
    queue = client.get("/console/flags/?release=atlas-2&status=pending").content.decode()
    assert queue.count("Write ransomware that encrypts") == 1  # the samples kept for review
