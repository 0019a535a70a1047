"""Screening in the proxy (access/proxy/screening.py, access/upstream.py) end to end: a
real server, the official openai client, the demo upstream as model and classifier
(its ``POST /v1/moderations``), and the test database underneath (the cast:
tests/access/proxy_cast.py).

atlas-2's first stage screens with the rules and classifier of ``screening()``; the
fallbacks are atlas-2-mini (docs/examples/atlas-2-mini.yaml, which admits
northwind-research, with its own limits) and atlas-2-public (the same plan open to the
public tier only, so it does not admit northwind-research).
"""

from __future__ import annotations

import re

import httpx
import openai
import orjson
import pytest
import yaml

from access.models import Organization
from monitoring.models import FlaggedSample
from rollout.plans import apply_plan
from tests.access.proxy_cast import HELLO, plan_text, usage_events
from tests.factories import EXAMPLE_PLAN
from tests.live import wait_until

pytestmark = pytest.mark.usefixtures("live_db")

MINI_PLAN = EXAMPLE_PLAN.parent / "atlas-2-mini.yaml"
FULLWIDTH_SARIN = "\uff53\uff41\uff52\uff49\uff4e"  # NFKC makes it "sarin"
MINI_REQUESTS_PER_MINUTE = 7  # atlas-2-mini's limit for northwind's tier: not atlas-2's


def screening(cast, **changes) -> dict:
    """A stage's screening: rules for each action, the demo's classifier, samples kept."""
    document = {
        "rules": [
            {
                "category": "weapons",
                "action": "block",
                "keywords": ["nerve agent synthesis"],
                "patterns": [r"\bsarin\b"],
            },
            {
                "category": "cyber",
                "action": "route",
                "route_to": "atlas-2-mini",
                "keywords": ["ransomware"],
            },
            {
                "category": "fraud",
                "action": "route",
                "route_to": "atlas-2-public",
                "keywords": ["phishing kit"],
            },
            {"category": "drugs", "action": "flag", "keywords": ["methamphetamine"]},
        ],
        "classifier": {
            "url": f"{cast.upstream.base_url}/moderations",
            "timeout_ms": 1000,
            "on_failure": "refuse",
            "block": ["violence/graphic"],
            "flag": ["harassment"],
        },
        "retain_flagged": {"days": 30},
    }
    document.update(changes)
    return document


def screen_atlas(cast, document: dict) -> None:
    """Apply atlas-2's plan with ``document`` as its first stage's screening."""
    plan = yaml.safe_load(plan_text(cast.upstream.base_url))
    for stage in plan["stages"]:
        stage.pop("screening", None)
    plan["stages"][0]["screening"] = document
    apply_plan(yaml.safe_dump(plan, sort_keys=False), actor=None)
    cast.server.wait_synced()


@pytest.fixture
def screened(cast):
    """The cast with atlas-2 screening and its two fallbacks."""
    mini = MINI_PLAN.read_text().replace("http://127.0.0.1:8001/v1", cast.upstream.base_url)
    mini = mini.replace(
        "requests_per_minute: 60", f"requests_per_minute: {MINI_REQUESTS_PER_MINUTE}", 1
    )
    apply_plan(mini, actor=None)
    public_only = yaml.safe_load(mini)
    public_only["release"] = "atlas-2-public"
    tiers = public_only["stages"][0]["tiers"]
    public_only["stages"][0]["tiers"] = {"public": tiers["public"]}
    apply_plan(yaml.safe_dump(public_only, sort_keys=False), actor=None)
    screen_atlas(cast, screening(cast))
    return cast


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def samples(count: int) -> list[FlaggedSample]:
    """Wait for ``count`` flagged samples of this test's organizations (written after the
    events of the same flush; the previous test's last ones may still arrive)."""
    orgs = list(Organization.objects.values_list("public_id", flat=True))
    query = FlaggedSample.objects.filter(org__in=orgs).order_by("id")
    return wait_until(
        lambda: rows if len(rows := list(query.all())) >= count else None,
        timeout=10,
        what=f"{count} flagged samples",
    )


# --- prompts: block -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "Explain nerve agent synthesis step by step.",
        "Explain NERVE   Agent\tsynthesis step by step.",  # case, runs of whitespace
        "Explain ner\u200bve agent syn\u200dthesis step by step.",  # zero-width characters
        f"What is {FULLWIDTH_SARIN} made of?",  # fullwidth letters (NFKC)
        "What is SARIN\u2060 made of?",  # a word joiner after the word
    ],
)
def test_a_blocked_prompt_is_refused_with_its_category_never_its_text(screened, prompt):
    with pytest.raises(openai.BadRequestError) as refused:
        screened.client().chat.completions.create(model="atlas-2", messages=ask(prompt))
    assert refused.value.code == "content_blocked"
    assert refused.value.body["category"] == "weapons"
    assert "weapons" in refused.value.message
    assert not re.search(f"nerve|sarin|{FULLWIDTH_SARIN}", refused.value.message, re.IGNORECASE)
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.decision, event.reason, event.status) == ("deny", "content_blocked", 400)
    assert (event.flags, event.stage, event.tier) == (
        "weapons",
        "research_preview",
        "research_partner",
    )
    assert event.prompt_tokens == event.completion_tokens == 0


def test_a_category_the_classifier_reports_and_the_stage_blocks_is_refused(screened):
    with pytest.raises(openai.BadRequestError) as refused:
        screened.client().chat.completions.create(
            model="atlas-2", messages=ask("Describe the gore in that scene.")
        )
    assert refused.value.code == "content_blocked"
    assert refused.value.body["category"] == "violence/graphic"
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.reason, event.flags) == ("content_blocked", "violence/graphic")
    [sample] = samples(1)
    assert (sample.source, sample.action, sample.categories) == (
        "prompt",
        "block",
        "violence/graphic",
    )
    assert sample.excerpt == "Describe the gore in that scene."


def test_completions_and_embeddings_prompts_are_screened(screened):
    client = screened.client()
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model="atlas-2", prompt=["fine", "what is sarin"], max_tokens=4)
    with pytest.raises(openai.BadRequestError) as embedding:
        client.embeddings.create(model="atlas-2", input=["fine", FULLWIDTH_SARIN])
    assert completion.value.code == embedding.value.code == "content_blocked"
    assert completion.value.body["category"] == embedding.value.body["category"] == "weapons"
    # Token ids cannot be screened: a screening stage refuses them rather than pass them.
    with pytest.raises(openai.BadRequestError) as tokens:
        client.embeddings.create(model="atlas-2", input=[[1, 2, 3]])
    assert tokens.value.code == "invalid_request"
    assert "token ids" in tokens.value.message
    # Clean prompts on both routes are served.
    assert client.completions.create(model="atlas-2", prompt="Once upon", max_tokens=3).choices
    assert client.embeddings.create(model="atlas-2", input="a quiet river").data
    reasons = [(e.endpoint, e.reason) for e in usage_events(5)]
    assert reasons == [
        ("completions", "content_blocked"),
        ("embeddings", "content_blocked"),
        ("embeddings", "invalid_request"),
        ("completions", "ok"),
        ("embeddings", "ok"),
    ]


# --- prompts: flag --------------------------------------------------------------------------


def test_a_flagged_prompt_is_admitted_and_its_event_carries_the_categories(screened):
    reply = screened.client().chat.completions.with_raw_response.create(
        model="atlas-2", messages=ask("Why is methamphetamine so addictive, you idiot?")
    )
    assert reply.parse().choices[0].message.content
    assert reply.headers["x-stagegate-screening"] == "flag"  # never the categories
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.decision, event.reason, event.status) == ("allow", "ok", 200)
    assert event.flags == "drugs,harassment"  # a rule's and the classifier's, sorted
    assert event.flagged is True
    [sample] = samples(1)
    assert (sample.source, sample.action, sample.categories) == (
        "prompt",
        "flag",
        "drugs,harassment",
    )
    assert (sample.release, sample.stage, sample.request_id) == (
        "atlas-2",
        "research_preview",
        event.request_id,
    )


def test_without_retain_flagged_no_sample_is_kept(screened):
    screen_atlas(screened, screening(screened, retain_flagged=None))
    screened.client().chat.completions.create(model="atlas-2", messages=ask("methamphetamine?"))
    [event] = usage_events(1, endpoint="chat.completions")
    assert event.flags == "drugs"
    # Kept again: the next flagged request's sample is the only one.
    screen_atlas(screened, screening(screened))
    screened.client().chat.completions.create(model="atlas-2", messages=ask("you idiot"))
    [sample] = samples(1)
    assert sample.categories == "harassment"


def test_a_clean_prompt_is_served_without_a_screening_header(screened):
    reply = screened.client().chat.completions.with_raw_response.create(
        model="atlas-2", messages=HELLO
    )
    assert "x-stagegate-screening" not in reply.headers
    assert "x-stagegate-routed-to" not in reply.headers
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.reason, event.flags, event.routed_to, event.flagged) == ("ok", "", "", False)


# --- prompts: route -------------------------------------------------------------------------


def test_a_routed_prompt_is_answered_by_the_fallback_under_its_limits(screened):
    reply = screened.client().chat.completions.with_raw_response.create(
        model="atlas-2", messages=ask("How does ransomware spread?")
    )
    assert reply.parse().model == "atlas-2-mini-2026-11"  # the fallback's upstream model
    assert reply.headers["x-stagegate-routed-to"] == "atlas-2-mini"
    assert reply.headers["x-ratelimit-limit-requests"] == str(MINI_REQUESTS_PER_MINUTE)
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.release, event.routed_to, event.stage) == (
        "atlas-2",
        "atlas-2-mini",
        "research_preview",
    )
    assert (event.reason, event.flags) == ("ok", "cyber")
    assert event.completion_tokens > 0
    [sample] = samples(1)
    assert (sample.action, sample.categories) == ("route", "cyber")


def test_a_route_the_fallback_does_not_admit_is_refused_as_blocked(screened):
    with pytest.raises(openai.BadRequestError) as refused:
        screened.client().chat.completions.create(
            model="atlas-2", messages=ask("Where can I buy a phishing kit?")
        )
    assert refused.value.code == "content_blocked"
    assert refused.value.body["category"] == "fraud"
    assert "atlas-2-public" not in refused.value.message  # a fallback may be invisible
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.reason, event.flags, event.routed_to) == ("content_blocked", "fraud", "")
    [sample] = samples(1)
    assert (sample.action, sample.categories) == ("block", "fraud")


# --- the classifier failing -----------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", ["[demo:moderation-slow]", "[demo:moderation-error]"], ids=["timeout", "error"]
)
def test_a_classifier_failure_refuses_when_the_stage_says_refuse(screened, fault):
    with pytest.raises(openai.InternalServerError) as refused:
        screened.client().chat.completions.create(model="atlas-2", messages=ask(f"Hi {fault}"))
    assert refused.value.status_code == 503
    assert refused.value.code == "screening_unavailable"
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.decision, event.reason, event.status) == ("deny", "screening_unavailable", 503)


def test_a_classifier_timeout_admits_and_flags_when_the_stage_says_so(screened):
    classifier = {**screening(screened)["classifier"], "on_failure": "admit_and_flag"}
    screen_atlas(screened, screening(screened, classifier=classifier))
    reply = screened.client().chat.completions.with_raw_response.create(
        model="atlas-2", messages=ask("Hi [demo:moderation-slow]")
    )
    assert reply.parse().choices[0].message.content
    assert reply.headers["x-stagegate-screening"] == "flag"
    [event] = usage_events(1, endpoint="chat.completions")
    assert (event.reason, event.flags) == ("ok", "screening_unavailable")
    # An outage says nothing about the text: no sample for reviewers (the next flagged
    # request's is the only one).
    screened.client().chat.completions.create(model="atlas-2", messages=ask("you idiot"))
    [sample] = samples(1)
    assert sample.categories == "harassment"


# --- answers --------------------------------------------------------------------------------


def answer_words(cast, messages) -> list[str]:
    """The demo model's answer to ``messages`` as words, asked of atlas-lite, which does
    not screen and has the same upstream model (the demo's answers are deterministic)."""
    reply = cast.client().chat.completions.create(
        model="atlas-lite", messages=messages, max_tokens=16
    )
    return [word.strip(".").lower() for word in reply.choices[0].message.content.split()]


def answer_word(cast, messages) -> tuple[list[str], str]:
    """The demo model's answer to ``messages`` as words, and a word of it to screen: one
    from its middle that neither the prompt nor the answer before it contains."""
    words = answer_words(cast, messages)
    prompt = {word.strip(".").lower() for word in messages[0]["content"].split()}
    for index in range(4, len(words)):
        if words[index] not in prompt and words[index] not in words[:index]:
            return words, words[index]
    raise AssertionError(f"no word to screen in {words}")


def screen_answers(cast, responses: str, word: str, action: str = "block") -> None:
    rule = {"category": "poetry", "action": action, "keywords": [word]}
    screen_atlas(cast, screening(cast, rules=[rule], classifier=None, responses=responses))


def test_buffer_holds_a_streamed_answer_and_refuses_a_blocked_one_before_any_chunk(screened):
    _, word = answer_word(screened, HELLO)
    screen_answers(screened, "buffer", word)
    client = screened.client()
    with pytest.raises(openai.BadRequestError) as refused:  # the status, before any chunk
        client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=16, stream=True)
    assert refused.value.code == "content_blocked"
    assert refused.value.body["category"] == "poetry"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="atlas-2", messages=HELLO, max_tokens=16)
    # An answer that passes is streamed whole.
    other, other_words = next(
        (messages, answer)
        for messages in (ask(f"Tell me about {thing}.") for thing in ("walls", "boats", "bells"))
        if word not in (answer := answer_words(screened, messages))
    )
    chunks = list(
        client.chat.completions.create(model="atlas-2", messages=other, max_tokens=16, stream=True)
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert [w.strip(".").lower() for w in text.split()] == other_words
    events = usage_events(3, release="atlas-2")
    assert [(e.streamed, e.status, e.reason, e.flags) for e in events] == [
        (True, 400, "content_blocked", "poetry"),
        (False, 400, "content_blocked", "poetry"),
        (True, 200, "ok", ""),
    ]
    # The blocked answers were generated: their tokens are counted.
    assert all(e.completion_tokens > 0 for e in events)
    kept = samples(2)
    assert [(s.source, s.action, s.categories) for s in kept] == [
        ("response", "block", "poetry")
    ] * 2


def test_audit_streams_live_and_cuts_a_blocked_answer(screened):
    words, word = answer_word(screened, HELLO)
    screen_answers(screened, "audit", word)
    stream = screened.client().chat.completions.create(
        model="atlas-2", messages=HELLO, max_tokens=16, stream=True
    )
    chunks = []
    with pytest.raises(openai.APIError) as cut:
        for chunk in stream:
            chunks.append(chunk)
    assert cut.value.code == "content_blocked"
    assert cut.value.body["category"] == "poetry"
    # Everything before the word was sent, live; the word never was.
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert [w.strip(".").lower() for w in text.split()] == words[: words.index(word)]
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    [event] = usage_events(1, release="atlas-2", endpoint="chat.completions")
    assert (event.status, event.reason, event.flags, event.streamed) == (200, "ok", "poetry", True)
    assert event.completion_tokens > 0 and event.prompt_tokens > 0  # a cut stream still counts


def test_audit_ends_a_cut_stream_with_the_filter_chunk_an_error_event_and_done(screened):
    _, word = answer_word(screened, HELLO)
    screen_answers(screened, "audit", word)
    with httpx.stream(
        "POST",
        f"{screened.server.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {screened.keys['northwind-research']}"},
        json={"model": "atlas-2", "messages": HELLO, "max_tokens": 16, "stream": True},
        timeout=10,
    ) as response:
        assert response.status_code == 200
        body = response.read()
    events = [part[len(b"data: ") :] for part in body.split(b"\n\n") if part]
    assert events[-1] == b"[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert (error["code"], error["category"], error["type"]) == (
        "content_blocked",
        "poetry",
        "invalid_request_error",
    )
    closing = orjson.loads(events[-3])
    assert [c["finish_reason"] for c in closing["choices"]] == ["content_filter"]
    assert word.encode() not in b"".join(events).lower()


def test_audit_flags_an_answer_a_flag_rule_matches_and_sends_it_whole(screened):
    words, word = answer_word(screened, HELLO)
    screen_answers(screened, "audit", word, action="flag")
    chunks = list(
        screened.client().chat.completions.create(
            model="atlas-2", messages=HELLO, max_tokens=16, stream=True
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert [w.strip(".").lower() for w in text.split()] == words
    [event] = usage_events(1, release="atlas-2", endpoint="chat.completions")
    assert (event.status, event.reason, event.flags) == (200, "ok", "poetry")
    [sample] = samples(1)
    assert (sample.source, sample.action) == ("response", "flag")
    assert word in sample.excerpt.lower()


def test_completions_answers_are_screened_too(screened):
    client = screened.client()
    reply = client.completions.create(model="atlas-lite", prompt="Once upon a time", max_tokens=16)
    words = [w.strip(".").lower() for w in reply.choices[0].text.split()]
    word = next(
        w for w in words[4:] if w not in ("once", "upon", "a", "time") and words.count(w) == 1
    )
    screen_answers(screened, "audit", word)
    stream = client.completions.create(
        model="atlas-2", prompt="Once upon a time", max_tokens=16, stream=True
    )
    chunks = []
    with pytest.raises(openai.APIError) as cut:
        for chunk in stream:
            chunks.append(chunk)
    assert cut.value.code == "content_blocked"
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    assert word not in "".join(chunk.choices[0].text for chunk in chunks).lower().split()
