"""LLM backends behind one async interface: `await llm.chat(messages, ...) -> str`.

`OpenAIChat` talks to any OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, a cloud API)
with bounded concurrency, a per-request deadline and retries; `LocalChat` runs a `transformers` causal LM
and batches concurrent requests into one `generate` call.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Protocol

from qembed.errors import QembedError

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class LLMError(Exception):
    """A request failed for good (retries exhausted or a non-retryable answer). `transient` errors
    (timeouts, 429, 5xx, connection errors) are worth trying again in a later run."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class ChatLLM(Protocol):
    model_name: str

    async def chat(self, messages: Messages, *, max_tokens: int, temperature: float) -> str: ...

    async def aclose(self) -> None: ...


@dataclass
class RetryPolicy:
    max_retries: int = 5
    backoff_base: float = 1.0  # seconds before the first retry; doubles each time
    backoff_max: float = 60.0
    retry_after_max: float = 300.0  # never sleep longer than this on a server's Retry-After

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt` (0-based): exponential backoff with jitter,
        or the server's `Retry-After` when it asks for longer."""
        backoff = min(self.backoff_max, self.backoff_base * 2**attempt)
        backoff *= 0.5 + random.random() / 2  # jitter: spread clients that failed together
        if retry_after is not None:
            return max(min(retry_after, self.retry_after_max), backoff)
        return backoff


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


RETRYABLE_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
FATAL_STATUS = {401, 403, 404}  # wrong key or model name: every request would fail the same way


class OpenAIChat:
    """Async client for an OpenAI-compatible `/chat/completions` endpoint.

    At most `concurrency` requests are in flight. Each attempt has a hard `timeout` (seconds, whole
    request). 429/5xx/timeouts/connection errors are retried per `retry`, honouring `Retry-After`.
    With `disable_thinking`, requests carry `chat_template_kwargs={"enable_thinking": false}` (Qwen3 on
    vLLM/SGLang); a server that rejects that field with HTTP 400 is asked again without it.
    The API key is read from the environment variable `api_key_env` and never logged.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        disable_thinking: bool = True,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        import httpx

        headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise QembedError(f"environment variable {api_key_env} (named by --api-key-env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        base = base_url.rstrip("/")
        self.url = base if base.endswith("/chat/completions") else base + "/chat/completions"
        self.model_name = model
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.disable_thinking = disable_thinking
        self.extra_body = dict(extra_body or {})
        self.requests_sent = 0
        self._semaphore = asyncio.Semaphore(concurrency)
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def _body(self, messages: Messages, max_tokens: int, temperature: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if self.disable_thinking:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        body.update(self.extra_body)
        return body

    async def chat(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.7) -> str:
        import httpx

        last = ""
        for attempt in range(self.retry.max_retries + 1):
            retry_after = None
            async with self._semaphore:
                self.requests_sent += 1
                try:
                    response = await asyncio.wait_for(
                        self._client.post(self.url, json=self._body(messages, max_tokens, temperature)),
                        timeout=self.timeout,
                    )
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    last = f"timed out after {self.timeout:g}s"
                except httpx.TransportError as exc:
                    last = f"connection error: {exc.__class__.__name__}: {exc}"
                else:
                    status = response.status_code
                    if status == 200:
                        return _content(response)
                    snippet = response.text[:300].replace("\n", " ")
                    last = f"HTTP {status}: {snippet}"
                    if status == 400 and self.disable_thinking and "chat_template_kwargs" in response.text:
                        log.info("server rejects chat_template_kwargs; sending requests without it")
                        self.disable_thinking = False
                        continue
                    if status in FATAL_STATUS:
                        hint = " (check --llm-model, and whether the base URL needs /v1)" if status == 404 else ""
                        raise QembedError(f"LLM server at {self.url} answered {last}{hint}")
                    if status not in RETRYABLE_STATUS:
                        raise LLMError(last, transient=False)
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
            if attempt < self.retry.max_retries:
                wait = self.retry.delay(attempt, retry_after)
                log.debug("LLM request failed (%s); retry %d in %.2fs", last, attempt + 1, wait)
                await asyncio.sleep(wait)
        raise LLMError(f"gave up after {self.retry.max_retries + 1} attempts: {last}", transient=True)

    async def aclose(self) -> None:
        await self._client.aclose()


def _content(response) -> str:
    try:
        data = response.json()
        content = data["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise LLMError(f"malformed chat-completions response: {response.text[:200]!r}", transient=False) from None
    return content or ""


# Used when a tokenizer ships without a chat template (e.g. a base model): plain ChatML, as Qwen uses.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class LocalChat:
    """A local `transformers` causal LM. Concurrent `chat` calls are gathered into batches of up to
    `batch_size` prompts (left padding) and generated together in a worker thread; greedy when
    `temperature` is 0, sampled otherwise."""

    def __init__(self, path: str, *, batch_size: int = 8, device: str | None = None, dtype: str | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from qembed.models.loading import pick_device, pick_dtype

        try:
            target = pick_device(device)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, target)).eval()
            self.model.to(target)
        except QembedError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, AssertionError, ImportError) as exc:
            # a missing or malformed folder, an unknown architecture, a device that is not there
            reason = " ".join(str(exc).split())[:300]
            raise QembedError(f"cannot load local LLM {path!r} on {device or target}: {reason}") from None
        self.device = str(target)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = CHATML_TEMPLATE
        self.model_name = os.path.basename(os.path.normpath(path))
        self.batch_size = batch_size
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    def _prompt(self, messages: Messages) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    def generate(self, prompts: list[str], *, max_tokens: int, temperature: float) -> list[str]:
        """Generate one completion per formatted prompt (synchronous, one padded batch)."""
        import torch

        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = temperature > 0
        kwargs: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_tokens}
        if sample:
            kwargs["temperature"] = temperature
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        eos = [t for t in {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int)]
        with torch.inference_mode():
            out = self.model.generate(
                **batch, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=eos or None, **kwargs
            )
        new = out[:, batch["input_ids"].shape[1] :]
        return self.tokenizer.batch_decode(new, skip_special_tokens=True)

    async def chat(self, messages: Messages, *, max_tokens: int = 512, temperature: float = 0.7) -> str:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._serve())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((self._prompt(messages), max_tokens, temperature, future))
        return await future

    async def _serve(self) -> None:
        assert self._queue is not None
        while True:
            items = [await self._queue.get()]
            await asyncio.sleep(0)  # let the other waiting callers enqueue
            while len(items) < self.batch_size and not self._queue.empty():
                items.append(self._queue.get_nowait())
            # one generate per (max_tokens, temperature) setting in this batch
            groups: dict[tuple[int, float], list] = {}
            for item in items:
                groups.setdefault((item[1], item[2]), []).append(item)
            for (max_tokens, temperature), group in groups.items():
                try:
                    texts = await asyncio.to_thread(
                        self.generate, [g[0] for g in group], max_tokens=max_tokens, temperature=temperature
                    )
                except Exception as exc:  # surface to every waiting caller
                    # out of memory and other runtime errors may not recur (smaller batch, freed memory):
                    # transient, so the next run tries the job again
                    transient = isinstance(exc, (RuntimeError, MemoryError))
                    error = LLMError(f"local generation failed: {type(exc).__name__}: {exc}", transient=transient)
                    if transient and "out of memory" in str(exc).lower():
                        log.warning("local generation ran out of memory; lower --local-batch-size or --max-tokens")
                    for g in group:
                        if not g[3].done():
                            g[3].set_exception(error)
                    continue
                for g, text in zip(group, texts):
                    if not g[3].done():
                        g[3].set_result(text)

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
            self._queue = None
