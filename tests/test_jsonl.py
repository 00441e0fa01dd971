import pytest

from qembed.data.jsonl import JsonlAppender, iter_jsonl, read_jsonl
from qembed.errors import QembedError


def test_torn_last_line_is_ignored_only_when_asked(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}\n{"a": 3, "b"')
    assert read_jsonl(path, allow_truncated_tail=True) == [{"a": 1}, {"a": 2}]
    with pytest.raises(QembedError, match=r"out.jsonl:4: invalid JSON"):
        read_jsonl(path)


def test_bad_lines_name_their_number(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(QembedError, match=r"in.jsonl:2: expected a JSON object, got list"):
        list(iter_jsonl(path, allow_truncated_tail=True))  # a complete line is never excused
    path.write_text('{"a": 1}\nnot json\n{"a": 2}\n', encoding="utf-8")
    with pytest.raises(QembedError, match=r"in.jsonl:2: invalid JSON"):
        read_jsonl(path, allow_truncated_tail=True)
    with pytest.raises(QembedError, match="file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_appender_drops_a_torn_tail_before_appending(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2, "b"')
    with JsonlAppender(path, fsync=False) as out:
        out.write({"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 3}]
