import pytest

from qembed.models import prompts


def test_query_template_is_exact():
    assert prompts.format_query("what is rice blast", "Find answers") == "Instruct: Find answers\nQuery:what is rice blast"
    assert prompts.format_query("q", None) == "q"
    assert prompts.format_query("q", "") == "q"


def test_instruction_is_recovered_from_the_published_prompt():
    prompt = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
    assert prompts.instruction_from_prompt(prompt) == prompts.DEFAULT_QUERY_INSTRUCTION
    assert prompts.instruction_from_prompt("query: ") is None


def test_reranker_prompt_is_exact():
    text = prompts.format_rerank_pair("Q", "D", "I")
    assert text == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        "<Instruct>: I\n<Query>: Q\n<Document>: D<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert "<Instruct>: " + prompts.DEFAULT_RERANK_INSTRUCTION in prompts.format_rerank_pair("Q", "D", None)


def test_one_query_format_value():
    from qembed.models.prompts import MODEL_DEFAULT, NO_INSTRUCTION, QueryFormat

    assert QueryFormat.of("Find it") == QueryFormat("instruction", "Find it")
    assert QueryFormat.of("Find it").prefix == "Instruct: Find it\nQuery:"
    assert QueryFormat.of(None) == QueryFormat.of("") == NO_INSTRUCTION and NO_INSTRUCTION.prefix == ""
    assert QueryFormat.of(None, "query: ") == QueryFormat("prompt", "query: ")
    assert QueryFormat.of(MODEL_DEFAULT) is MODEL_DEFAULT and repr(MODEL_DEFAULT) == "MODEL_DEFAULT"
    assert QueryFormat.of("Find it").label == "Find it" and NO_INSTRUCTION.label is None
    with pytest.raises(ValueError, match="resolved"):
        _ = MODEL_DEFAULT.prefix
    with pytest.raises(ValueError):
        QueryFormat("instruction", "")
    with pytest.raises(ValueError):
        QueryFormat("sometimes")
    with pytest.raises(TypeError):
        QueryFormat.of(3)
