"""nginx in front of a model server with Stagegate's ``/authz`` deciding (docs/gateways.md).

The configuration under test is ``docs/examples/nginx.conf`` itself, the one the doc
shows, with only its ports and log path swapped: a real nginx on a free port, the demo
upstream as the model server, a real Stagegate as the authorization service, and the
official openai client calling ``/atlas-2/v1``.

Cast: atlas-2 in its first stage (research_preview: northwind-research only), so
acme-commercial's key is valid but its tier may not see the model.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from access.keys import issue_key
from rollout.plans import apply_plan
from tests.access.proxy_cast import unscreened
from tests.factories import EXAMPLE_PLAN, make_org
from tests.live import ROOT, Process, free_port, wait_until

CONFIG = ROOT / "docs" / "examples" / "nginx.conf"
DOC = ROOT / "docs" / "gateways.md"
NGINX = shutil.which("nginx", path=f"{os.environ.get('PATH', '')}:/usr/sbin")
HELLO = [{"role": "user", "content": "Say hello through the gateway."}]

# What nginx needs besides the site file, all inside a scratch directory.
MAIN_CONF = """\
worker_processes 1;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    include {dir}/stagegate.conf;
}}
"""


def render(*, stagegate: str, upstream: str, listen: str, access_log: Path) -> str:
    """docs/examples/nginx.conf with its addresses and log path replaced."""
    text = CONFIG.read_text()
    for documented, ours in {
        "server 127.0.0.1:8000;": f"server {stagegate};",
        "server 127.0.0.1:8001;": f"server {upstream};",
        "listen 8080;": f"listen {listen};",
        "/var/log/nginx/stagegate.log": str(access_log),
    }.items():
        assert text.count(documented) == 1, f"{CONFIG.name} should say {documented!r} once"
        text = text.replace(documented, ours)
    return text


class Nginx:
    """nginx running the documented site on a free port, its files in a scratch dir."""

    def __init__(self, *, stagegate: str, upstream: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="stagegate-nginx-"))
        self.dir.chmod(0o755)  # a root master runs its workers as nobody
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.access_log = self.dir / "access.log"
        site = render(
            stagegate=stagegate,
            upstream=upstream,
            listen=f"127.0.0.1:{self.port}",
            access_log=self.access_log,
        )
        (self.dir / "stagegate.conf").write_text(site)
        (self.dir / "nginx.conf").write_text(MAIN_CONF.format(dir=self.dir))
        self.process = Process(
            [
                NGINX,
                "-e",
                "stderr",
                "-p",
                f"{self.dir}/",
                "-c",
                str(self.dir / "nginx.conf"),
                "-g",
                f"daemon off; pid {self.dir}/nginx.pid;",
            ],
            dict(os.environ),
            "nginx-",
        )
        try:
            wait_until(self._listening, timeout=10, what="nginx to listen")
        except AssertionError:
            self.stop()
            raise

    def _listening(self) -> bool:
        if self.process.popen.poll() is not None:
            raise AssertionError(f"nginx exited:\n{self.process.output()}")
        with socket.create_connection(("127.0.0.1", self.port), timeout=1):
            return True

    def log_entries(self, offset: int, count: int) -> list[dict[str, str]]:
        """The ``key=value`` fields of the access log's lines after ``offset`` bytes,
        once there are ``count`` of them (nginx writes a line after the answer)."""

        def read():
            lines = self.access_log.read_bytes()[offset:].decode().splitlines()
            return lines if len(lines) >= count else None

        lines = wait_until(read, timeout=5, what=f"{count} access log lines")
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in lines]

    def log_size(self) -> int:
        return self.access_log.stat().st_size if self.access_log.exists() else 0

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def plan_text(base_url: str, *, rpm: int | None = None) -> str:
    """The example plan without screening: /authz refuses a stage that screens
    (tests/access/test_proxy_authz.py), since a gateway keeps the prompt to itself."""
    text = EXAMPLE_PLAN.read_text()
    text = text.replace("http://127.0.0.1:8001/v1", base_url)  # the upstream and classifier
    if rpm is not None:
        text = re.sub(r"requests_per_minute: \d+", f"requests_per_minute: {rpm}", text)
    return unscreened(text)


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light); CI installs it")
    return NGINX


@pytest.fixture(scope="module")
def nginx(nginx_binary, proxy_server, demo_upstream):
    server = Nginx(
        stagegate=f"127.0.0.1:{proxy_server.port}", upstream=f"127.0.0.1:{demo_upstream.port}"
    )
    yield server
    server.stop()


@dataclass
class Cast:
    nginx: Nginx
    keys: dict[str, str]

    def client(self, org: str = "northwind-research") -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.nginx.url}/atlas-2/v1", api_key=self.keys[org], max_retries=0
        )


@pytest.fixture
def cast(live_db, nginx, proxy_server, demo_upstream) -> Cast:
    orgs = [
        make_org("northwind-research", "research_partner"),
        make_org("acme-commercial", "verified_commercial"),
    ]
    apply_plan(plan_text(demo_upstream.base_url), actor=None)
    keys = {org.slug: issue_key(organization=org, name="test", actor=None).raw_key for org in orgs}
    proxy_server.wait_synced()
    return Cast(nginx, keys)


def test_the_doc_shows_the_config_that_is_tested():
    blocks = re.findall(r"^```nginx\n(.*?)^```$", DOC.read_text(), re.MULTILINE | re.DOTALL)
    assert blocks[0] == CONFIG.read_text()


def test_admitted_key_is_served_with_its_org_passed_upstream(cast):
    offset = cast.nginx.log_size()
    reply = cast.client().with_raw_response.chat.completions.create(
        model="atlas-2", messages=HELLO, max_tokens=8
    )
    chat = reply.parse()
    assert chat.usage.completion_tokens == 8
    # The body goes through unchanged: the model server saw "atlas-2", not atlas-2-2026-11.
    assert chat.model == "atlas-2"
    assert reply.headers["x-ratelimit-limit-requests"] == "60"
    assert reply.headers["x-ratelimit-remaining-requests"] == "59"

    chunks = list(
        cast.client().chat.completions.create(
            model="atlas-2", messages=HELLO, max_tokens=8, stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content

    by_header = httpx.post(
        f"{cast.nginx.url}/atlas-2/v1/embeddings",
        json={"model": "atlas-2", "input": "one"},
        headers={"x-api-key": cast.keys["northwind-research"]},
    )
    assert by_header.status_code == 200

    served = {
        "authz": "200",
        "reason": "ok",
        "org": "northwind-research",
        "tier": "research_partner",
        "stage": "research_preview",
        "upstream_model": "atlas-2-2026-11",
    }
    assert cast.nginx.log_entries(offset, 3) == [served] * 3


def test_hidden_model_is_refused_with_403(cast):
    with pytest.raises(openai.PermissionDeniedError) as refused:
        cast.client("acme-commercial").chat.completions.create(model="atlas-2", messages=HELLO)
    assert refused.value.code == "unknown_model"
    assert refused.value.response.headers["x-stagegate-reason"] == "unknown_model"


def test_bad_or_missing_key_is_refused_with_401(cast):
    client = openai.OpenAI(
        base_url=f"{cast.nginx.url}/atlas-2/v1", api_key="sk-not-ours", max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as refused:
        client.chat.completions.create(model="atlas-2", messages=HELLO)
    assert refused.value.code == "invalid_key"

    bare = httpx.post(f"{cast.nginx.url}/atlas-2/v1/chat/completions", json={"model": "atlas-2"})
    assert (bare.status_code, bare.json()["error"]["code"]) == (401, "invalid_key")


def test_rate_limited_key_gets_429_with_retry_after(cast, proxy_server, demo_upstream):
    apply_plan(plan_text(demo_upstream.base_url, rpm=2), actor=None)
    proxy_server.wait_synced()
    if time.time() % 60 > 55:  # keep the three calls inside one fixed minute window
        time.sleep(61 - time.time() % 60)
    client = cast.client()

    def call() -> str:
        try:
            client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=2)
            return "ok"
        except openai.RateLimitError as exc:
            assert exc.code == "rate_limited"
            assert exc.response.headers["x-stagegate-reason"] == "rate_limited"
            assert 1 <= int(exc.response.headers["retry-after"]) <= 60
            return "limited"

    assert [call() for _ in range(3)] == ["ok", "ok", "limited"]


def test_unreachable_stagegate_fails_closed_with_503(nginx_binary, demo_upstream):
    gateway = Nginx(
        stagegate=f"127.0.0.1:{free_port()}", upstream=f"127.0.0.1:{demo_upstream.port}"
    )
    try:
        client = openai.OpenAI(
            base_url=f"{gateway.url}/atlas-2/v1", api_key="sk-any", max_retries=0
        )
        with pytest.raises(openai.InternalServerError) as refused:
            client.chat.completions.create(model="atlas-2", messages=HELLO)
    finally:
        gateway.stop()
    assert (refused.value.status_code, refused.value.code) == (503, "stagegate_unreachable")
