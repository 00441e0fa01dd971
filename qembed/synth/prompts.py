"""Every prompt the synthesis pipeline sends, in one place. Bump `PROMPT_VERSION` whenever a prompt's
wording or output contract changes: it is written into every record so data from different prompt
versions can be told apart."""

from __future__ import annotations

PROMPT_VERSION = "qembed-synth-v1"

QUESTION_TYPES = ("keywords", "acquire_knowledge", "summary", "yes_or_no", "background")
DIFFICULTIES = ("high_school", "university", "phd")

QUESTION_TYPE_HELP = {
    "keywords": "a short keyword-style search query, like what people type into a search box",
    "acquire_knowledge": "a question asking for a specific fact, method or explanation the passage gives",
    "summary": "a request for an overview or summary of what the passage covers",
    "yes_or_no": "a question that can be answered with yes or no from the passage",
    "background": "a question about the context, causes or background of the passage's topic",
}
DIFFICULTY_HELP = {
    "high_school": "everyday vocabulary; someone with a high-school education could ask it",
    "university": "uses some field terminology; a university student or practitioner would ask it",
    "phd": "expert level; precise technical terms and a specialised angle",
}

LANGUAGE_NAMES = {
    "zh": "Simplified Chinese", "en": "English", "ja": "Japanese", "ko": "Korean", "fr": "French",
    "de": "German", "es": "Spanish", "pt": "Portuguese", "it": "Italian", "ru": "Russian", "ar": "Arabic",
    "vi": "Vietnamese", "th": "Thai", "id": "Indonesian", "nl": "Dutch", "tr": "Turkish", "pl": "Polish",
    "hi": "Hindi", "zh-tw": "Traditional Chinese",
}  # fmt: skip

SYSTEM = "You write realistic training data for search engines. Follow the output format exactly."


def language_name(code: str) -> str:
    return LANGUAGE_NAMES.get(code.lower(), code)


def _characters(candidates: list[str]) -> str:
    return "\n".join(f"{i}. {c}" for i, c in enumerate(candidates, start=1))


def config_messages(passage: str, candidates: list[str]) -> list[dict[str, str]]:
    """Stage 1: pick who would search for this passage, what kind of question, and how hard."""
    types = "\n".join(f"- {t}: {h}" for t, h in QUESTION_TYPE_HELP.items())
    levels = "\n".join(f"- {d}: {h}" for d, h in DIFFICULTY_HELP.items())
    user = f"""Below is a passage and a numbered list of people. Imagine one of these people looking for \
information that this passage contains. Decide:
1. Character: which one of the listed people is most likely to search for it (copy the description exactly);
2. Question_Type: what kind of query that person would write, one of:
{types}
3. Difficulty: how specialised the query is, one of:
{levels}

Passage:
<passage>
{passage}
</passage>

Characters:
{_characters(candidates)}

Reply with a single JSON object and nothing else, for example:
{{"Character": "<one description from the list>", "Question_Type": "acquire_knowledge", "Difficulty": "university"}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def _length_phrase(length: int, unit: str) -> str:
    return f"about {length} {'words' if unit == 'words' else 'characters'}"


def query_messages(
    passage: str, character: str, question_type: str, difficulty: str, length: int, unit: str, language: str
) -> list[dict[str, str]]:
    """Stage 2: write the query under explicit requirements."""
    user = f"""You are this person: {character}

You are searching for information that the passage below answers. Write the search query you would type.

Passage:
<passage>
{passage}
</passage>

Requirements:
- Query type: {question_type} ({QUESTION_TYPE_HELP[question_type]})
- Difficulty: {difficulty} ({DIFFICULTY_HELP[difficulty]})
- Length: {_length_phrase(length, unit)}
- Language: write the query in {language_name(language)}, whatever the passage's language
- The query must be answerable from the passage, but do not copy sentences from it and do not mention \
"the passage" or "the text".

Reply with a single JSON object and nothing else: {{"query": "<your query>"}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def sts_messages(sentence: str, language: str) -> list[dict[str, str]]:
    """Symmetric pairs: a paraphrase of one sentence, same meaning, different wording."""
    task = f"""Rewrite the sentence below so that it keeps exactly the same meaning but uses different wording \
and sentence structure. Write it in {language_name(language)}. Do not add or drop information."""
    return _rewrite_messages(task, "sentence", sentence, "paraphrase", "your sentence")


def bitext_messages(text: str, source: str, target: str) -> list[dict[str, str]]:
    """Bitext pairs: a faithful translation into another language."""
    task = f"""Translate the {language_name(source)} text below into {language_name(target)}. Translate \
faithfully and fluently; keep names, numbers and technical terms accurate."""
    return _rewrite_messages(task, "text", text, "translation", "your translation")


def _rewrite_messages(task: str, tag: str, content: str, key: str, placeholder: str) -> list[dict[str, str]]:
    """A task over one quoted piece of text, answered as `{key: ...}` JSON."""
    user = f"""{task}

{tag.capitalize()}:
<{tag}>
{content}
</{tag}>

Reply with a single JSON object and nothing else: {{"{key}": "<{placeholder}>"}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def repair_message(problem: str, example: str) -> dict[str, str]:
    """Follow-up turn after an unusable answer: say what was wrong and ask again, briefly."""
    return {
        "role": "user",
        "content": f"Your reply could not be used: {problem}. Answer again with only the JSON object, "
        f"no explanation, in this form: {example}",
    }


CONFIG_EXAMPLE = '{"Character": "...", "Question_Type": "...", "Difficulty": "..."}'
QUERY_EXAMPLE = '{"query": "..."}'
STS_EXAMPLE = '{"paraphrase": "..."}'
BITEXT_EXAMPLE = '{"translation": "..."}'
