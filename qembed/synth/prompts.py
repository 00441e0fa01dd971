"""Every prompt the synthesis pipeline and the review judge send, in one place. Bump `PROMPT_VERSION`
(`JUDGE_PROMPT_VERSION` for the judge) whenever a prompt's wording or output contract changes: it is written
into every record (label) so data from different prompt versions can be told apart."""

from __future__ import annotations

from collections.abc import Sequence

# (term, definition or None): the glossary terms offered for one passage (`qembed.synth.glossary.Term`)
Terms = Sequence[tuple[str, str | None]]

PROMPT_VERSION = "qembed-synth-v2"  # v2: glossary vocabulary, classification, LLM hard negatives
JUDGE_PROMPT_VERSION = "qembed-judge-v1"

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


def vocabulary_block(terms: Terms, *, translation: bool = False) -> str:
    """The glossary terms offered for a passage, as a prompt section ("" without terms)."""
    if not terms:
        return ""
    lines = "\n".join(f"- {term}: {definition}" if definition else f"- {term}" for term, definition in terms)
    if translation:
        head = "Terminology of this domain (translate these terms accurately and consistently):"
    else:
        head = "Domain vocabulary (use the terms that fit naturally, spelled exactly as here):"
    return f"\n\n{head}\n{lines}"


def query_messages(
    passage: str, character: str, question_type: str, difficulty: str, length: int, unit: str, language: str,
    terms: Terms = (),
) -> list[dict[str, str]]:
    """Stage 2: write the query under explicit requirements (using the offered glossary `terms`)."""
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
"the passage" or "the text".{vocabulary_block(terms)}

Reply with a single JSON object and nothing else: {{"query": "<your query>"}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def sts_messages(sentence: str, language: str) -> list[dict[str, str]]:
    """Symmetric pairs: a paraphrase of one sentence, same meaning, different wording."""
    task = f"""Rewrite the sentence below so that it keeps exactly the same meaning but uses different wording \
and sentence structure. Write it in {language_name(language)}. Do not add or drop information."""
    return _rewrite_messages(task, "sentence", sentence, "paraphrase", "your sentence")


def bitext_messages(text: str, source: str, target: str, terms: Terms = ()) -> list[dict[str, str]]:
    """Bitext pairs: a faithful translation into another language."""
    task = f"""Translate the {language_name(source)} text below into {language_name(target)}. Translate \
faithfully and fluently; keep names, numbers and technical terms accurate.{vocabulary_block(terms, translation=True)}"""
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


# ---------------------------------------------------------------------------------------- classification
#: The instruction a classification record's query carries (Qwen3 style: the task, then the text).
CLASSIFICATION_INSTRUCTION = "Given a text, retrieve the category that describes it"


def label_proposal_messages(passages: Sequence[str], max_labels: int) -> list[dict[str, str]]:
    """Once per corpus, without a label file: a category set that covers a sample of its passages."""
    shown = "\n\n".join(f"<passage>\n{p}\n</passage>" for p in passages)
    user = f"""Below are {len(passages)} passages sampled from one collection of documents. Propose a set of \
between 3 and {max_labels} categories that together cover what this collection is about, such that each \
passage fits one category well. Give each category a short name and a one-sentence description.

{shown}

Reply with a single JSON object and nothing else, for example:
{{"labels": [{{"label": "<short name>", "description": "<one sentence>"}}, ...]}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def classification_messages(passage: str, labels: Terms, length: int, unit: str,
                            language: str, terms: Terms = ()) -> list[dict[str, str]]:  # fmt: skip
    """Classification pairs: pick the passage's category, then write a short text of that category."""
    listed = "\n".join(f"- {name}: {description}" if description else f"- {name}" for name, description in labels)
    user = f"""Here is a passage and a list of categories.

Passage:
<passage>
{passage}
</passage>

Categories:
{listed}

1. Decide which one category the passage belongs to (copy its name exactly).
2. Write a short text of that category about the passage's subject, as someone might write it (a post, a \
question, a note or a headline): {_length_phrase(length, unit)}, in {language_name(language)}. Do not name \
the category and do not copy sentences from the passage.{vocabulary_block(terms)}

Reply with a single JSON object and nothing else: {{"label": "<category name>", "text": "<your text>"}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------ LLM hard negatives
def negatives_messages(query: str, passage: str, count: int, language: str, terms: Terms = ()) -> list[dict[str, str]]:
    """Hard negatives: passages on the query's topic, in its vocabulary, that do not answer it."""
    user = f"""A search engine must learn to tell apart passages that answer a query from passages that only \
look as if they do. Here is a query and a passage that answers it.

Query: {query}

Passage:
<passage>
{passage}
</passage>

Write {count} different passages in {language_name(language)}, each about as long as the passage above, that \
share the query's topic and vocabulary but do NOT answer the query: they discuss a related but different \
question, a different case, or a different step (for code: similar-looking code that does something \
else). Each must read as a plausible real document and must not contradict itself.{vocabulary_block(terms)}

Reply with a single JSON object and nothing else: {{"passages": ["<passage 1>", ...]}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# ------------------------------------------------------------------------------------ instruction search
def instruction_messages(pairs: Sequence[tuple[str, str]], count: int) -> list[dict[str, str]]:
    """Instruction search: one-sentence task instructions (the Qwen3 query instruction) for a collection, from
    example (query, relevant passage) pairs."""
    examples = "\n\n".join(f"Query: {query}\n<passage>\n{passage}\n</passage>" for query, passage in pairs)
    user = f"""A text embedding model reads a one-sentence task instruction before each search query, such as \
"Given a web search query, retrieve relevant passages that answer the query". Below are example queries of \
one collection, each with a passage that answers it.

{examples}

Write {count} different one-sentence task instructions for a text embedding model, in English, for searching \
this collection: each names what kind of query it is and what kind of passage to retrieve (for example "Given \
a farmer's question about rice diseases, retrieve advice that answers it"), without quoting any example.

Reply with a single JSON object and nothing else: {{"instructions": ["<instruction 1>", ...]}}"""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# -------------------------------------------------------------------------------------------- review judge
JUDGE_SYSTEM = "You judge search results for relevance. Answer only with the JSON object asked for."


def judge_messages(query: str, passage: str, task: str | None, instruction: str | None = None) -> list[dict[str, str]]:
    """The review judge: is this (query, positive) pair a correct training pair for its task?"""
    question = {
        "sts": "Do the two texts mean the same thing?",
        "bitext": "Is the first text a faithful translation of the second?",
        "classification": "Does the text belong to the category described?",
    }.get(task or "", "Does the passage answer the query, or contain the information the query asks for?")
    task_line = f"\nTask: {instruction}" if instruction else ""
    user = f"""{question}{task_line}

Query:
<query>
{query}
</query>

{"Category" if task == "classification" else "Passage"}:
<passage>
{passage}
</passage>

Answer true only when a careful human annotator would call the pair relevant. Reply with a single JSON object \
and nothing else: {{"relevant": true}} or {{"relevant": false}}"""
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


CONFIG_EXAMPLE = '{"Character": "...", "Question_Type": "...", "Difficulty": "..."}'
QUERY_EXAMPLE = '{"query": "..."}'
STS_EXAMPLE = '{"paraphrase": "..."}'
BITEXT_EXAMPLE = '{"translation": "..."}'
LABELS_EXAMPLE = '{"labels": [{"label": "...", "description": "..."}]}'
CLASSIFICATION_EXAMPLE = '{"label": "...", "text": "..."}'
NEGATIVES_EXAMPLE = '{"passages": ["...", "..."]}'
JUDGE_EXAMPLE = '{"relevant": true}'
