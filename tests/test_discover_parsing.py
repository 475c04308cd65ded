"""The discover prompt's shape and the parser that reads the model's ideas back, on good and broken answers."""

from __future__ import annotations

import pytest

from recsys.discover.parse import DEFAULT_CATEGORY, FALLBACK_CATEGORY, parse_ideas
from recsys.discover.prompt import MAX_IDEAS, answer_prefix, discover_prompt, make_case, worked_ideas

NEED = "a garden party next week"


def pairs(parsed) -> list[tuple[str, str]]:
    return [(idea.category, idea.description) for idea in parsed.ideas]


def test_well_formed_answer_is_read_as_written():
    text = (
        "Summary: Tableware and lights for an outdoor party.\n"
        "Ideas:\n"
        "1. Tableware | RED RETROSPOT PAPER CUPS\n"
        "2. Lighting | GARDEN LANTERN WITH CANDLE\n"
        "3. Decoration | PAPER BUNTING FLAGS\n"
        "\n"
        "Case 4\n"
    )
    parsed = parse_ideas(text, NEED)
    assert parsed.summary == "Tableware and lights for an outdoor party"
    assert pairs(parsed) == [
        ("Tableware", "RED RETROSPOT PAPER CUPS"),
        ("Lighting", "GARDEN LANTERN WITH CANDLE"),
        ("Decoration", "PAPER BUNTING FLAGS"),
    ]
    assert not parsed.fallback and not parsed.repaired and parsed.problems == []


def test_other_separators_bullets_and_a_missing_header_are_forgiven():
    text = (
        "Summary: Things for a party\n"
        "- Tableware: PAPER PLATES\n"
        "* Lighting - STRING OF LIGHTS\n"
        "3) **Games** \u2013 GARDEN SKITTLES SET\n"
    )
    parsed = parse_ideas(text, NEED)
    assert pairs(parsed) == [
        ("Tableware", "PAPER PLATES"),
        ("Lighting", "STRING OF LIGHTS"),
        ("Games", "GARDEN SKITTLES SET"),
    ]
    assert not parsed.fallback


def test_ideas_without_category_get_a_default_and_are_flagged():
    parsed = parse_ideas("Summary: x\nIdeas:\n1. PAPER PLATES\n2. Cups | PAPER CUPS\n3. NAPKINS\n", NEED)
    assert pairs(parsed) == [(DEFAULT_CATEGORY, "PAPER PLATES"), ("Cups", "PAPER CUPS"), (DEFAULT_CATEGORY, "NAPKINS")]
    assert parsed.repaired
    assert any("no category" in problem for problem in parsed.problems)


def test_repeats_are_dropped_and_more_than_five_are_cut():
    lines = [f"{i}. Kind | ITEM NUMBER {chr(64 + i)}" for i in range(1, 9)]
    lines.insert(2, "3. Kind | item number a")
    parsed = parse_ideas("Summary: many\nIdeas:\n" + "\n".join(lines), NEED)
    assert [idea.description for idea in parsed.ideas] == [f"ITEM NUMBER {c}" for c in "ABCDE"]
    assert len(parsed.ideas) == MAX_IDEAS
    assert any("repeats" in problem for problem in parsed.problems)
    assert any("kept the first" in problem for problem in parsed.problems)


@pytest.mark.parametrize(
    "tail",
    [
        "Case 4\nCustomer: from France\nNeed: more\nSummary: other\nIdeas:\n1. X | OTHER THING\n",
        "1. X | OTHER THING\n",
        "Summary: second summary\n1. X | OTHER THING\n",
        "That is all for this customer, and here is another list.\n4. X | OTHER THING\n",
    ],
)
def test_an_invented_next_case_is_not_read(tail):
    text = "Summary: s\nIdeas:\n1. A | FIRST THING\n2. B | SECOND THING\n" + tail
    parsed = parse_ideas(text, NEED)
    assert [idea.description for idea in parsed.ideas] == ["FIRST THING", "SECOND THING"]
    assert any("only 2" in problem for problem in parsed.problems)


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "Summary:",
        "Summary: I am sorry, I cannot help with that.",
        "Summary: fine\nIdeas:\n1. |\n2. ...\n3. Category | 12\n",
        "\x00\x01\x02<start_of_turn>\n",
    ],
)
def test_an_unusable_answer_falls_back_to_the_need(text):
    parsed = parse_ideas(text, NEED)
    assert parsed.fallback and not parsed.repaired
    assert pairs(parsed) == [(FALLBACK_CATEGORY, NEED)]
    assert any("no usable idea" in problem for problem in parsed.problems)


def test_summary_may_be_missing_and_texts_are_flattened_and_cut():
    long_description = "VERY LONG " * 40
    text = f"Ideas:\n1. Tea\tware | {long_description}\n2. Cups | CUP\u2028WITH SAUCER\n3. Jugs | JUG\n"
    parsed = parse_ideas(text, NEED)
    assert parsed.summary is None and "no summary" in parsed.problems
    assert parsed.ideas[0].category == "Tea ware"
    assert len(parsed.ideas[0].description) <= 120
    assert parsed.ideas[1].description == "CUP WITH SAUCER"
    assert all("\n" not in idea.description for idea in parsed.ideas)


def test_a_labelled_idea_word_inside_a_line_is_not_a_header():
    parsed = parse_ideas("Summary: s\nIdeas:\n1. Ideal gifts | TEA SET\n2. Need-to-haves | NAPKINS\n", NEED)
    assert pairs(parsed) == [("Ideal gifts", "TEA SET"), ("Need-to-haves", "NAPKINS")]


def test_summary_after_the_ideas_ends_the_answer():
    text = "1. Tableware | PAPER CUPS\n2. Lighting | LANTERN\n3. Games | SKITTLES\nSummary: For a party.\n4. X | MORE\n"
    parsed = parse_ideas(text, NEED)
    assert parsed.summary == "For a party"
    assert [idea.description for idea in parsed.ideas] == ["PAPER CUPS", "LANTERN", "SKITTLES"]


def test_ideas_copied_from_the_worked_cases_are_dropped():
    copied = sorted(worked_ideas())[:2]
    text = f"1. A | {copied[0].lower()}\n2. B | {copied[1]}\n3. C | PAPER CUPS\nSummary: s\n"
    parsed = parse_ideas(text, NEED)
    assert [idea.description for idea in parsed.ideas] == ["PAPER CUPS"]
    assert sum("copies a worked example" in problem for problem in parsed.problems) == 2
    only_copies = parse_ideas(f"1. A | {copied[0]}\nSummary: s\n", NEED)
    assert only_copies.fallback and pairs(only_copies) == [(FALLBACK_CATEGORY, NEED)]


def test_prompt_shows_two_worked_answers_and_ends_at_the_first_idea():
    case = make_case("stocking the shop\nfor Christmas", "France", ["A", "", "B"])
    prompt = discover_prompt(case)
    assert prompt.endswith("Need: stocking the shop for Christmas\n" + answer_prefix(case))
    assert answer_prefix(case) == "Ideas for stocking the shop for Christmas:\n1."
    assert prompt.count("Summary:") == 2
    assert "Customer: from France, recently bought A; B" in prompt
    worked_answers = prompt.split("Case 3")[0]
    for section in worked_answers.split("Case ")[1:]:
        answer = section[section.index("Ideas for"):]
        parsed = parse_ideas(answer, "x", copied=frozenset())
        assert 3 <= len(parsed.ideas) <= MAX_IDEAS and parsed.problems == [] and parsed.summary


def test_prompt_without_a_profile_says_so():
    prompt = discover_prompt(make_case("a birthday", None, []))
    assert prompt.split("Case 3")[1].startswith("\nCustomer: new, nothing known about them\nNeed: a birthday\n")
