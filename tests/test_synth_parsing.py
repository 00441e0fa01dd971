"""Parsing LLM output: JSON extraction, <think> stripping, value normalisation, character matching."""

from __future__ import annotations

import pytest

from qembed.synth.parsing import (
    ParseError,
    check_language,
    check_length,
    detect_language,
    extract_json,
    match_character,
    parse_config,
    parse_text,
    strip_think,
    text_length,
)

CANDIDATES = [
    "A rice farmer in Hunan who grows two crops a year.",
    "A plant pathologist studying fungal diseases.",
    "一位在东北种植玉米的合作社社长。",
]


def test_strip_think_variants():
    assert strip_think("<think>hmm {x}</think>\n{\"a\": 1}") == '{"a": 1}'
    assert strip_think("reasoning that began in the prompt</think>answer") == "answer"
    assert strip_think("answer<think>cut off while thinking") == "answer"
    assert strip_think("<THINK>a</THINK>b<think>c</think>d") == "bd"


def test_extract_json_from_fences_prose_and_think():
    assert extract_json('{"a": 1}') == {"a": 1}
    assert extract_json('Sure:\n```json\n{"a": {"b": [1, 2]}}\n```\nDone') == {"a": {"b": [1, 2]}}
    assert extract_json('The answer is {"a": "x}"} as requested.') == {"a": "x}"}
    assert extract_json('<think>{"wrong": true}</think>{"right": true}') == {"right": True}
    assert extract_json('{broken {"ok": 2}') == {"ok": 2}
    with pytest.raises(ParseError, match="no JSON"):
        extract_json("no json here [1, 2]")


def test_extract_json_never_evaluates():
    with pytest.raises(ParseError):
        extract_json("{'a': __import__('os').getcwd()}")


def test_parse_config_normalises_values_and_keys():
    raw = '{"character": "a RICE farmer in hunan who grows two crops a year", "Question Type": "Yes_Or_No", "difficulty": "PhD"}'
    config = parse_config(raw, CANDIDATES)
    assert config.character == CANDIDATES[0]
    assert config.question_type == "yes_or_no"
    assert config.difficulty == "phd"
    config = parse_config('{"Character": 2, "Question_Type": "Acquire Knowledge", "Difficulty": "High School"}', CANDIDATES)
    assert (config.character, config.question_type, config.difficulty) == (CANDIDATES[1], "acquire_knowledge", "high_school")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("A plant pathologist studying fungal diseases", 1),
        ("plant pathologist", 1),  # unique containment
        ("Character 3", 2),
        ("一位在东北种植玉米的合作社社长", 2),
        ("A plant pathologist studing fungal diseases.", 1),  # typo: fuzzy match
    ],
)
def test_match_character_tolerant(value, expected):
    assert match_character(value, CANDIDATES) == CANDIDATES[expected]


@pytest.mark.parametrize("value", ["A pirate", "", None, "Character 9", "a"])
def test_match_character_rejects_strangers(value):
    with pytest.raises(ParseError):
        match_character(value, CANDIDATES)


def test_parse_config_rejects_bad_values():
    with pytest.raises(ParseError, match="Question_Type"):
        parse_config(f'{{"Character": "{CANDIDATES[0]}", "Question_Type": "poem", "Difficulty": "phd"}}', CANDIDATES)
    with pytest.raises(ParseError, match="Difficulty"):
        parse_config(f'{{"Character": "{CANDIDATES[0]}", "Question_Type": "summary", "Difficulty": "master"}}', CANDIDATES)
    with pytest.raises(ParseError, match="lacks"):
        parse_config(f'{{"Character": "{CANDIDATES[0]}"}}', CANDIDATES)


def test_parse_text_json_plain_and_failures():
    assert parse_text('{"query": "  how to   grow rice "}', "query") == "how to grow rice"
    assert parse_text("<think>x</think>Query: \u201chow to grow rice\u201d", "query") == "how to grow rice"
    assert parse_text("问题：水稻怎么种", "query") == "水稻怎么种"
    with pytest.raises(ParseError):
        parse_text('{"answer": "x"}', "query")
    with pytest.raises(ParseError):
        parse_text("line one\nline two\nline three", "query")
    with pytest.raises(ParseError):
        parse_text('{"query": ""}', "query")


def test_language_and_length_checks():
    assert detect_language("水稻的病虫害防治方法") == "zh"
    assert detect_language("How to control rice blast") == "en"
    assert detect_language("稲のいもち病の防除方法について") == "ja"
    check_language("水稻怎么种", "zh")
    with pytest.raises(ParseError):
        check_language("how to grow rice", "zh")
    with pytest.raises(ParseError):
        check_language("水稻怎么种植才能高产", "en")
    assert text_length("水稻 怎么 种", "chars") == 5
    assert text_length("how to grow rice", "words") == 4
    check_length("how to grow rice", 5, "words")
    with pytest.raises(ParseError, match="long"):
        check_length(" ".join(["word"] * 80), 10, "words")
