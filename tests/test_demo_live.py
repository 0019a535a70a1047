"""The demo as ``make run`` serves it: the demo model on a port of one's choosing, a
taken port refused, and the demo traffic generator's requests becoming usage events."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys

import openai
import pytest
from django.core.management import call_command

from access.models import ApiKey
from monitoring.models import AuditEvent, UsageEvent
from rollout.demo import follow_demo_upstream
from rollout.models import Release
from stagegate.demo_traffic import MIX, DemoTraffic
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
    assert follow_demo_upstream("http://127.0.0.1:9001/v1", ["atlas-2-2026-11"]) == []
    applied = AuditEvent.objects.filter(action="plan.applied", actor="system:serve")
    assert applied.count() == 1


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
