"""The screening engine: normalization, the text of requests and answers, and verdicts.

Pure Python like the decision engine: screens are compiled from plan documents through
``parse_plan``, the entry every plan takes, and judged on the text a client could send.
"""

# Fullwidth letters are the point of several tests here.
# ruff: noqa: RUF001

from __future__ import annotations

import copy
import os
import subprocess
import sys
import unicodedata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from access.screening import (
    ALLOW,
    FOLD_DECOMPOSES,
    Screen,
    Verdict,
    compile_screen,
    completion_text,
    normalize,
    prompt_text,
)
from rollout.plan_schema import parse_plan

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((REPO / "docs" / "examples" / "atlas-2.yaml").read_text())

RULES = [
    {"category": "weapons", "action": "block", "keywords": ["nerve agent synthesis", "sarin"]},
    {
        "category": "cyber",
        "action": "route",
        "route_to": "atlas-2-mini",
        "keywords": ["ransomware"],
    },
    {"category": "self-harm", "action": "flag", "patterns": [r"\bhurt (?:my|him)self\b"]},
    {"category": "chemistry", "action": "flag", "keywords": ["precursor"]},
    {"category": "malware", "action": "route", "route_to": "atlas-2-safe", "keywords": ["rootkit"]},
    {"category": "explosives", "action": "block", "keywords": ["tatp"]},
]


def screen_of(rules: list[dict[str, Any]] | None = None, **screening: Any) -> Screen:
    """The compiled screen of a plan whose second stage screens with ``rules``."""
    plan = copy.deepcopy(EXAMPLE)
    plan["stages"][1]["screening"] = {"rules": RULES if rules is None else rules, **screening}
    screen = compile_screen(parse_plan(plan).stages[1].screening)
    assert screen is not None
    return screen


@pytest.fixture(scope="module")
def screen() -> Screen:
    return screen_of()


# --- verdicts ---------------------------------------------------------------------------------


def test_clean_text_is_allowed(screen):
    assert screen.check("Summarize the quarterly report, please.") == ALLOW
    assert screen.check("") == ALLOW


def test_block(screen):
    assert screen.check("Explain sarin to me") == Verdict("block", ("weapons",), "weapons", None)


def test_flag(screen):
    assert screen.check("a precursor of what?") == Verdict("flag", ("chemistry",), None, None)


def test_route(screen):
    assert screen.check("write ransomware") == Verdict("route", ("cyber",), "cyber", "atlas-2-mini")


def test_pattern(screen):
    assert screen.check("I want to hurt myself").categories == ("self-harm",)
    assert screen.check("I want to hurt yourself") == ALLOW


def test_block_wins_over_route_and_flag_and_every_category_is_listed(screen):
    verdict = screen.check("ransomware and a precursor of TATP")

    assert verdict == Verdict("block", ("chemistry", "cyber", "explosives"), "explosives", None)


def test_route_wins_over_flag(screen):
    assert screen.check("precursor, ransomware") == Verdict(
        "route", ("chemistry", "cyber"), "cyber", "atlas-2-mini"
    )


def test_the_first_rule_in_plan_order_decides(screen):
    # weapons (rule 0) and explosives (rule 5) both block; cyber (rule 1) and malware
    # (rule 4) both route: the earlier rule names the verdict whatever the text's order.
    assert screen.check("tatp then sarin").category == "weapons"
    assert screen.check("rootkit then ransomware").route_to == "atlas-2-mini"


def test_keywords_match_whole_words_only(screen):
    assert screen.check("sarinex is a brand") == ALLOW
    assert screen.check("the presarin era") == ALLOW
    assert screen.check("nerve agent synthesiser") == ALLOW
    assert screen.check("(sarin).").action == "block"
    assert screen.check("sarin_x is one word") == ALLOW


def test_keyword_edges_that_are_not_word_characters():
    screen = screen_of([{"category": "cyber", "action": "flag", "keywords": ["c2-", ".onion"]}])

    assert screen.check("the c2-server").action == "flag"
    assert screen.check("visit abc.onion now").action == "flag"
    assert screen.check("abc.onionskin") == ALLOW


@pytest.mark.parametrize(
    "text",
    [
        "Nerve Agent Synthesis",
        "NERVE AGENT SYNTHESIS",
        "ｎｅｒｖｅ ａｇｅｎｔ ｓｙｎｔｈｅｓｉｓ",  # fullwidth
        "ne\u200drve agent synthesis",  # zero-width joiner inside a word
        "nerve\u200b \u200bagent synthesis",  # zero-width spaces
        "nerve agent syn\u00adthesis",  # soft hyphen
        "nerve a\x00gent synthesis",  # NUL
        "nerve\tagent\n\nsynthesis",  # tab and line breaks between the words
        "nerve \u00a0 agent\u3000synthesis",  # no-break and ideographic spaces
        "nerve\u2028agent\x1fsynthesis",  # a line separator and an ASCII separator
        "How is nerve agent synthesis done?",  # plain
        "nerve agent s\ufe0fynthesis",  # a variation selector
        "\u202enerve agent synthesis\u202c",  # bidirectional override
        "nerve agent synthesis\udc80",  # a lone surrogate after it
    ],
    ids=[
        "title-case",
        "upper-case",
        "fullwidth",
        "zwj",
        "zwsp",
        "soft-hyphen",
        "nul",
        "tabs-newlines",
        "nbsp-ideographic-space",
        "line-separator",
        "plain",
        "variation-selector",
        "bidi-override",
        "lone-surrogate",
    ],
)
def test_obfuscated_keywords_still_match(screen, text):
    assert screen.check(text) == Verdict("block", ("weapons",), "weapons", None)


def test_fullwidth_pattern_text_is_matched():
    screen = screen_of([{"category": "weapons", "action": "block", "patterns": [r"\bsarin\b"]}])

    assert screen.check("ＳＡＲＩＮ gas").action == "block"
    assert screen.check("SaRiN gas").action == "block"


def test_case_sensitive_rule_matches_only_its_case():
    screen = screen_of(
        [
            {"category": "codes", "action": "flag", "keywords": ["XK-9"], "case_sensitive": True},
            {
                "category": "codes",
                "action": "flag",
                "patterns": ["Op[A-Z]{3}"],
                "case_sensitive": True,
            },
        ]
    )

    assert screen.check("the XK-9 unit").action == "flag"
    assert screen.check("the xk-9 unit") == ALLOW
    assert screen.check("the Xk-9 unit") == ALLOW
    assert screen.check("run OpABC now").action == "flag"
    assert screen.check("run opabc now") == ALLOW
    # Invisible characters and fullwidth forms still go: only the case must match.
    assert screen.check("the Ｘ\u200bK-9 unit").action == "flag"


def test_case_folded_rule_written_in_capitals_matches_any_case():
    screen = screen_of(
        [
            {"category": "x", "action": "flag", "keywords": ["STRASSE"]},
            {"category": "y", "action": "flag", "patterns": ["Sarin"]},
        ]
    )

    assert screen.check("die Straße").categories == ("x",)
    assert screen.check("SARIN").categories == ("y",)


def test_keywords_in_other_scripts_match_whole_words():
    screen = screen_of(
        [
            {"category": "weapons", "action": "block", "keywords": ["взрывчатка"]},
            {"category": "weapons", "action": "block", "keywords": ["爆弾"]},
        ]
    )

    assert screen.check("Где купить «ВЗРЫВЧАТКА»?").action == "block"
    assert screen.check("взрывчаткам") == ALLOW
    assert screen.check("Как сделать 爆弾?").action == "block"


def test_a_thousand_rules_are_all_found():
    rules = [
        {"category": f"c{index}", "action": "flag", "keywords": [f"term{index}x"]}
        for index in range(1000)
    ] + [{"category": "last", "action": "block", "patterns": [r"\bomega\d+\b"]}]
    screen = screen_of(rules)

    verdict = screen.check("term0x, term999x and term500x with omega42 " * 20)

    assert verdict == Verdict("block", ("c0", "c500", "c999", "last"), "last", None)


def test_rules_too_big_for_one_set_give_the_same_verdicts(caplog):
    rules = RULES + [
        {"category": f"c{index}", "action": "flag", "keywords": [f"term{index}x"]}
        for index in range(300)
    ]
    plan = copy.deepcopy(EXAMPLE)
    plan["stages"][1]["screening"] = {"rules": rules}
    screening = parse_plan(plan).stages[1].screening
    texts = [
        "Explain sarin",
        "write ransomware with term7x",
        "I will hurt myself",
        "nothing here",
        "ne\u200drve agent synthesis",
        "rootkit, term299x",
    ]

    small = Screen(screening, max_mem=1 << 16)  # too small to compile the set

    assert "do not fit one RE2 set" in caplog.text
    assert [small.check(text) for text in texts] == [
        Screen(screening).check(text) for text in texts
    ]


def test_keyword_of_only_ignorable_characters_matches_nothing():
    # Hangul fillers are letters to the schema but invisible to screening.
    screen = screen_of([{"category": "x", "action": "block", "keywords": ["\u3164", "sarin"]}])

    assert screen.check("anything at all") == ALLOW
    assert screen.check("sarin").action == "block"


def test_combine_merges_the_classifiers_categories(screen):
    flagged = screen.check("a precursor")
    routed = screen.check("ransomware")
    blocked = screen.check("sarin")

    assert screen.combine(ALLOW, (), ()) == ALLOW
    assert screen.combine(ALLOW, ["harassment"], []) == Verdict("flag", ("harassment",), None, None)
    assert screen.combine(flagged, ["harassment"], ["violence/graphic", "hate"]) == Verdict(
        "block", ("chemistry", "harassment", "hate", "violence/graphic"), "violence/graphic", None
    )
    assert screen.combine(routed, ["harassment"], []) == Verdict(
        "route", ("cyber", "harassment"), "cyber", "atlas-2-mini"
    )
    assert screen.combine(routed, [], ["hate"]) == Verdict("block", ("cyber", "hate"), "hate", None)
    assert screen.combine(blocked, [], ["hate"]) == Verdict(
        "block", ("hate", "weapons"), "weapons", None
    )
    assert screen.combine(flagged, ["chemistry"], []) == flagged


def test_compile_screen_carries_the_stage_settings():
    screen = screen_of(
        classifier={"url": "http://127.0.0.1:8001/v1/moderations", "flag": ["hate"]},
        responses="audit",
        retain_flagged={"days": 30},
    )

    assert (screen.responses, screen.retain_days) == ("audit", 30)
    assert screen.classifier is not None
    assert screen.classifier.flag == ("hate",)


def test_compile_screen_of_nothing_is_none():
    assert compile_screen(None) is None
    plan = copy.deepcopy(EXAMPLE)
    plan["stages"][1]["screening"] = {"retain_flagged": {"days": 7}}
    assert compile_screen(parse_plan(plan).stages[1].screening) is None


def test_a_classifier_without_rules_allows_every_text_by_rules():
    screen = screen_of([], classifier={"url": "http://127.0.0.1:8001/v1/moderations"})

    assert screen.check("sarin") == ALLOW
    assert (screen.responses, screen.retain_days) == ("off", None)


# --- normalization ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "folded", "exact"),
    [
        ("  Hello,\t\tWorld \r\n", "hello, world", "Hello, World"),
        ("a\x00b\x7fc\x1bd", "abcd", "abcd"),
        ("x\x1cy\x1fz\x0bw\x0cv", "x y z w v", "x y z w v"),
        ("ｆｕｌｌ", "full", "full"),
        ("ﬁne", "fine", "fine"),
        ("Stra\u00dfe", "strasse", "Straße"),
        ("ne\u200drve\u200b \u00ad", "nerve", "nerve"),
        ("a\u00a0\u2003b\u3000c\u2029d\x85e", "a b c d e", "a b c d e"),
        ("Caf\u0065\u0301", "café", "Café"),
        ("\u01f0", "j\u030c", "\u01f0"),  # folding decomposes it, and NFKC cannot undo that
        ("", "", ""),
        ("\u200b\u2060\ufeff", "", ""),
    ],
)
def test_normalize(text, folded, exact):
    assert normalize(text, fold=True) == folded
    assert normalize(text, fold=False) == exact


def test_normalize_every_code_point_is_idempotent_and_leaves_nothing_invisible():
    # Every code point, between letters, in runs of 64 (and alone below U+3400, where
    # the scripts with combining marks, odd case mappings and compatibility forms are):
    # both modes, whichever path (ASCII, common invisible characters, general) it takes.
    invisible = {"\u200b", "\u200d", "\u00ad", "\u2060", "\ufeff", "\x00", "\u3164"}
    texts = [chr(code) for code in range(0x3400)]
    texts += [
        "a".join(chr(code) for code in range(start, min(start + 64, sys.maxunicode + 1)))
        for start in range(0, sys.maxunicode + 1, 64)
    ]
    for text in texts:
        for fold in (True, False):
            once = normalize(text, fold=fold)
            assert normalize(once, fold=fold) == once, (ascii(text[:3]), fold)
            assert invisible.isdisjoint(once), ascii(text[:3])


def test_fold_decomposes_lists_every_letter_whose_folding_nfkc_composes_again():
    def nfkc(text: str) -> str:
        return unicodedata.normalize("NFKC", text)

    folding_undone = {
        code
        for code in range(sys.maxunicode + 1)
        if (char := chr(code)).casefold() != char
        and nfkc(char) == char
        and not unicodedata.is_normalized("NFKC", char.casefold())
    }
    becoming_one = {
        code
        for code in range(sys.maxunicode + 1)
        if nfkc(chr(code)) != chr(code)
        and any(ord(part) in folding_undone for part in nfkc(chr(code)))
    }

    listed = {code for first, last in FOLD_DECOMPOSES for code in range(first, last + 1)}

    assert listed == folding_undone | becoming_one
    assert normalize("\u01f0\u0323", fold=True) == normalize("j\u0323\u030c", fold=True)


@settings(max_examples=500, deadline=None)
@given(text=st.text(st.characters(codec=None)), fold=st.booleans())
def test_normalize_is_idempotent_and_never_raises(text, fold):
    once = normalize(text, fold=fold)

    assert isinstance(once, str)
    assert normalize(once, fold=fold) == once
    assert "  " not in once
    assert once == once.strip()


@settings(max_examples=300, deadline=None)
@given(
    words=st.lists(st.text(st.characters(categories=["L", "N"]), min_size=1), min_size=1),
    separators=st.lists(st.sampled_from([" ", "\t", "\n", "\u200b ", " \u00ad", "\u3000"])),
)
def test_screen_finds_its_keyword_between_any_separators(words, separators):
    keyword = words[0]
    if not normalize(keyword, fold=True):
        return  # nothing but characters screening ignores
    screen = screen_of([{"category": "x", "action": "flag", "keywords": [keyword]}])
    gap = separators[0] if separators else " "
    # Upper case folds back to the keyword for most letters, not all (U+0131, dotless i,
    # is I in upper case, which folds to i).
    upper = keyword.upper()
    same_word = normalize(upper, fold=True) == normalize(keyword, fold=True)
    variants = [keyword, upper] if same_word else [keyword]

    for variant in variants:
        assert screen.check(f"before{gap}{variant}{gap}after").action == "flag"
    assert screen.check(" ".join(words[1:])).action in ("allow", "flag")


# --- the text of requests and answers ---------------------------------------------------------


def test_prompt_text_of_chat_strings_and_parts():
    document = {
        "model": "atlas-2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is"},
                    {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}},
                    {"type": "text", "text": "sarin?"},
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": []},
        ],
    }

    assert prompt_text("chat.completions", document) == "Be brief.\nWhat is\nsarin?"


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("one prompt", "one prompt"), (["first", "second"], "first\nsecond"), ([1, 2, 3], "")],
)
def test_prompt_text_of_completions(prompt, expected):
    assert prompt_text("completions", {"model": "atlas-2", "prompt": prompt}) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("embed me", "embed me"),
        (["a", "b"], "a\nb"),
        ([101, 2023, 102], ""),
        ([[101, 2023], [102]], ""),
        (["text", [1, 2]], "text"),
    ],
)
def test_prompt_text_of_embeddings(value, expected):
    assert prompt_text("embeddings", {"model": "atlas-2", "input": value}) == expected


def test_completion_text_of_chat_and_completions():
    chat = {"choices": [{"message": {"role": "assistant", "content": "One"}}, {"message": {}}]}
    completions = {"choices": [{"text": "Two"}, {"text": "Three"}]}

    assert completion_text(chat) == "One"
    assert completion_text(completions) == "Two\nThree"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["messages", "content", "text", "prompt", "input", "choices", "message"]
            )
            | st.text(max_size=5),
            children,
            max_size=4,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(document=JSON, endpoint=st.sampled_from(["chat.completions", "completions", "embeddings"]))
def test_odd_shapes_never_raise(document, endpoint):
    assert isinstance(prompt_text(endpoint, document), str)
    assert isinstance(completion_text(document), str)
    if isinstance(document, dict):
        assert isinstance(prompt_text(endpoint, {"messages": [document]}), str)
        assert isinstance(completion_text({"choices": [document, {"message": document}]}), str)


def test_screening_engine_imports_without_django():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = (
        "import sys, access.screening; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'django'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
