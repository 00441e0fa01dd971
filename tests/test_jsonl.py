import pytest

from qembed.data.jsonl import JsonlAppender, drop_truncated_tail, iter_jsonl, iter_numbered_jsonl, read_jsonl
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


def test_reading_streams_line_by_line(tmp_path):
    path = tmp_path / "grow.jsonl"
    path.write_bytes(b'{"a": 1}\n')
    records = iter_jsonl(path)
    assert next(records) == {"a": 1}
    with path.open("ab") as f:  # written after reading began: seen only by a reader that streams
        f.write(b'\n{"a": 2}\n')
    assert list(records) == [{"a": 2}]
    assert list(iter_numbered_jsonl(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_torn_tail_of_a_long_file_is_cut_from_the_end(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, b"x" * 100) for i in range(2000))  # > one 64 KiB block
    path.write_bytes(whole + b'{"n": 2000, "pa')
    assert drop_truncated_tail(path) == len(b'{"n": 2000, "pa') and path.read_bytes() == whole
    assert drop_truncated_tail(path) == 0
    path.write_bytes(b"x" * 70_000)  # no newline at all: nothing complete to keep
    assert drop_truncated_tail(path) == 70_000 and path.read_bytes() == b""
