"""The OpenAI-compatible client against a scripted server on 127.0.0.1: retries, Retry-After, timeouts,
fatal answers, the API key, the thinking switch."""

from __future__ import annotations

import asyncio
import logging

import pytest
from llm_server import Reply, ScriptedLLMServer

from qembed.errors import QembedError
from qembed.synth.llm import LLMError, OpenAIChat, RetryPolicy, parse_retry_after

FAST = RetryPolicy(max_retries=3, backoff_base=0.02, backoff_max=0.1)
MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"}]


def _chat(server, reply_script=None, **kwargs):
    if reply_script is not None:
        server.reply = reply_script
    llm = OpenAIChat(server.base_url, "m", **{"retry": FAST, "timeout": 0.5, **kwargs})

    async def go():
        try:
            return await llm.chat(MESSAGES, max_tokens=8, temperature=0.0)
        finally:
            await llm.aclose()

    return asyncio.run(go()), llm


def _script(*replies):
    """Answer the n-th request with replies[n] (the last one repeats)."""

    def reply(body, attempt):
        return replies[min(attempt, len(replies) - 1)]

    return reply


@pytest.fixture
def server():
    with ScriptedLLMServer() as s:
        yield s


def test_success_sends_model_and_thinking_switch(server):
    text, llm = _chat(server, _script(Reply(content="hi there")))
    assert text == "hi there"
    body = server.requests[0]["body"]
    assert body["model"] == "m" and body["messages"] == MESSAGES and body["max_tokens"] == 8
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert llm.requests_sent == 1


def test_retries_on_500_then_succeeds(server):
    text, _ = _chat(server, _script(Reply(500, "boom"), Reply(502, "bad gateway"), Reply(content="ok")))
    assert text == "ok"
    assert [r["status"] for r in server.requests] == [500, 502, 200]


def test_honours_retry_after(server):
    text, _ = _chat(server, _script(Reply(429, "slow down", headers={"Retry-After": "1"}), Reply(content="ok")))
    assert text == "ok"
    first, second = server.requests
    assert first["status"] == 429
    assert second["time"] - first["time"] >= 0.95  # waited for Retry-After, not the 20 ms backoff


def test_timeout_is_retried(server):
    text, _ = _chat(server, _script(Reply(content="late", delay=2.0), Reply(content="ok")))
    assert text == "ok"
    assert len(server.requests) == 2


def test_gives_up_after_max_retries_as_transient(server):
    with pytest.raises(LLMError) as info:
        _chat(server, _script(Reply(503, "overloaded")))
    assert info.value.transient
    assert "503" in str(info.value)
    assert len(server.requests) == FAST.max_retries + 1


def test_client_error_is_not_retried(server):
    with pytest.raises(LLMError) as info:
        _chat(server, _script(Reply(400, "context length exceeded")))
    assert not info.value.transient
    assert len(server.requests) == 1


def test_bad_key_aborts_with_one_line_error(server):
    with pytest.raises(QembedError, match="401"):
        _chat(server, _script(Reply(401, "invalid api key")))
    assert len(server.requests) == 1


def test_server_without_chat_template_kwargs_is_asked_again_without_them(server):
    def reply(body, attempt):
        if "chat_template_kwargs" in body:
            return Reply(400, "Unrecognized request argument supplied: chat_template_kwargs")
        return Reply(content="ok")

    text, llm = _chat(server, reply)
    assert text == "ok"
    assert "chat_template_kwargs" not in server.requests[-1]["body"]
    assert not llm.disable_thinking


def test_connection_refused_is_transient():
    llm = OpenAIChat("http://127.0.0.1:9/v1", "m", retry=RetryPolicy(max_retries=1, backoff_base=0.01), timeout=1)

    async def go():
        try:
            await llm.chat(MESSAGES)
        finally:
            await llm.aclose()

    with pytest.raises(LLMError) as info:
        asyncio.run(go())
    assert info.value.transient and "connection" in str(info.value)


def test_api_key_from_env_is_sent_but_never_logged(server, monkeypatch, caplog):
    monkeypatch.setenv("QEMBED_TEST_KEY", "sk-secret-123")
    caplog.set_level(logging.DEBUG)
    text, _ = _chat(server, _script(Reply(500, "x"), Reply(content="ok")), api_key_env="QEMBED_TEST_KEY")
    assert text == "ok"
    assert server.requests[0]["auth"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in caplog.text
    monkeypatch.delenv("QEMBED_TEST_KEY")
    with pytest.raises(QembedError, match="QEMBED_TEST_KEY"):
        OpenAIChat(server.base_url, "m", api_key_env="QEMBED_TEST_KEY")


def test_concurrency_bound(server):
    server.reply = _script(Reply(content="ok"))
    server.latency = 0.2
    llm = OpenAIChat(server.base_url, "m", concurrency=4, retry=FAST, timeout=5)

    async def go():
        try:
            return await asyncio.gather(*(llm.chat(MESSAGES) for _ in range(12)))
        finally:
            await llm.aclose()

    assert asyncio.run(go()) == ["ok"] * 12
    times = sorted(r["time"] for r in server.requests)
    # 12 requests, 4 at a time, 0.2 s each: three waves
    assert times[-1] - times[0] >= 0.35
    assert max(sum(1 for t in times if s <= t < s + 0.1) for s in times) <= 4


def test_retry_policy_and_retry_after_parsing():
    policy = RetryPolicy(backoff_base=1.0, backoff_max=8.0)
    delays = [policy.delay(a) for a in range(6)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0 and all(d <= 8.0 for d in delays)
    assert policy.delay(0, retry_after=5.0) == 5.0
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: retry now
