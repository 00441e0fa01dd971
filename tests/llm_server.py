"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 — a test double of an external LLM API.

It reads the prompt the way a model would (which stage it is, the candidate characters, the requested
language) and answers plausibly. A document containing `[case=NAME]` gets a scripted behaviour instead:
JSON in code fences, a `<think>` block, invalid values, garbage, HTTP 429 with `Retry-After`, HTTP 500,
a hang past the client's timeout, and so on (see `CASES`). Every request is logged in `server.requests`.

Run standalone for benchmarks: `python tests/llm_server.py --latency 0.2` prints its base URL.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CASES = {
    "good": "valid JSON at once",
    "fence": "config JSON inside a ```json fence with prose around it",
    "think": "a <think>…</think> block before the answer",
    "normalise": "values needing normalisation: PhD, Yes_Or_No, character in other case without punctuation",
    "repair": "invalid values first, valid after the repair turn",
    "invalid": "invalid values every time",
    "garbage": "no JSON at all, every time",
    "plain": "the query stage answers plain text with a label",
    "r429": "HTTP 429 with Retry-After: 1 on the first attempt of each request",
    "r500": "HTTP 500 on the first two attempts of each request",
    "hang": "the first attempt of each request hangs for 3 s",
    "down": "HTTP 503 always",
    "badlabel": "classification: a label not in the list first, a listed one after the repair turn",
    "fewnegs": "hard negatives: always one passage fewer than asked",
}

# The category set the scripted model proposes for a corpus (label proposal prompt).
PROPOSED_LABELS = [
    {"label": "Crop diseases", "description": "diseases of crops, their causes and control"},
    {"label": "Fertiliser", "description": "fertilisers, nutrients and soil fertility"},
    {"label": "Irrigation", "description": "watering, drainage and water management"},
    {"label": "Other", "description": "anything else"},
]


@dataclass
class Reply:
    status: int = 200
    content: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def _candidates(prompt: str) -> list[str]:
    block = prompt.split("Characters:", 1)[1]
    return re.findall(r"^\d+\. (.+)$", block.split("\n\n", 1)[0], re.MULTILINE)


def _ok_json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _query_text(prompt: str) -> str:
    language = re.search(r"write the query in ([A-Za-z ()]+?),", prompt).group(1)
    if "Chinese" in language:
        return "水稻稻瘟病应该如何防治"
    return "how do farmers control rice blast disease"


def judge_relevant(query: str, passage: str) -> bool:
    """The scripted judge: relevant when query and passage share a word of 4+ letters (or two CJK characters)."""
    words = {w for w in re.findall(r"[a-z]{4,}", query.casefold())}
    if words & set(re.findall(r"[a-z]{4,}", passage.casefold())):
        return True
    cjk = re.sub(r"[^\u4e00-\u9fff]", "", query)
    return any(cjk[i : i + 2] in passage for i in range(len(cjk) - 1))


def default_reply(body: dict, attempt: int) -> Reply:
    """What the scripted model answers to `body`; `attempt` counts identical earlier requests (retries)."""
    messages = body["messages"]
    prompt = messages[1]["content"] if len(messages) > 1 else messages[-1]["content"]
    repair_turns = (len(messages) - 2) // 2
    match = re.search(r"\[case=(\w+)\]", prompt)
    case = match.group(1) if match else "good"
    if case == "r429" and attempt == 0:
        return Reply(429, headers={"Retry-After": "1"}, content="rate limited")
    if case == "r500" and attempt < 2:
        return Reply(500, content="internal error")
    if case == "hang" and attempt == 0:
        return Reply(200, content=_ok_json({"query": "too late"}), delay=3.0)
    if case == "down":
        return Reply(503, content="overloaded")
    if case == "garbage":
        return Reply(content="I am sorry, as a large language model I cannot help with that ~~~ ###")

    if "Propose a set of" in prompt:  # classification labels for a corpus
        return Reply(content=_ok_json({"labels": PROPOSED_LABELS}))

    if "Here is a passage and a list of categories." in prompt:  # classification
        passage = re.search(r"<passage>\n(.*?)\n</passage>", prompt, re.DOTALL).group(1).casefold()
        block = prompt.split("Categories:\n", 1)[1].split("\n\n", 1)[0]
        names = re.findall(r"^- ([^:\n]+)", block, re.MULTILINE)
        label = next((n for n in names if n.split()[0].casefold().rstrip("s") in passage), names[0])
        if case == "badlabel" and repair_turns == 0:
            label = "Astrology"
        language = re.search(r", in ([A-Za-z ()]+?)\. Do not name", prompt).group(1)
        text = "稻田里的叶片出现了褐色斑点" if "Chinese" in language else "brown spots appeared on the leaves after rain"
        return Reply(content=_ok_json({"label": label, "text": text}))

    if "do NOT answer the query" in prompt:  # LLM hard negatives
        count = int(re.search(r"Write (\d+) different passages", prompt).group(1))
        query = re.search(r"^Query: (.*)$", prompt, re.MULTILINE).group(1)
        if case == "fewnegs":
            count -= 1
        if "different passages in Simplified Chinese" in prompt:
            passages = [f"反例{i}：关于“{query}”这一话题、但回答另一个问题的段落。" for i in range(count)]
        else:
            passages = [f"Negative {i}: a passage on the topic of '{query}' about a related but different question."
                        for i in range(count)]  # fmt: skip
        return Reply(content=_ok_json({"passages": passages}))

    if "Answer true only when" in prompt:  # the review judge
        query = re.search(r"<query>\n(.*?)\n</query>", prompt, re.DOTALL).group(1)
        passage = re.search(r"<passage>\n(.*?)\n</passage>", prompt, re.DOTALL).group(1)
        return Reply(content=_ok_json({"relevant": judge_relevant(query, passage)}))

    if "Characters:" in prompt:  # stage 1
        character = _candidates(prompt)[0]
        config = {"Character": character, "Question_Type": "acquire_knowledge", "Difficulty": "university"}
        if case == "fence":
            return Reply(content=f"Sure! Here is the configuration:\n```json\n{_ok_json(config)}\n```\nHope it helps.")
        if case == "think":
            return Reply(content=f"<think>The reader is probably a farmer {{not json}}.</think>\n{_ok_json(config)}")
        if case == "normalise":
            config = {"character": character.upper().rstrip(".") + ".", "question type": "Yes_Or_No", "Difficulty": "PhD"}
            return Reply(content=_ok_json(config))
        if case == "invalid" or (case == "repair" and repair_turns == 0):
            return Reply(content=_ok_json({"Character": "A pirate", "Question_Type": "poem", "Difficulty": "master"}))
        return Reply(content=_ok_json(config))

    if "You are this person:" in prompt:  # stage 2
        query = _query_text(prompt)
        if case == "plain":
            return Reply(content=f"Query: {query}")
        if case == "think":
            return Reply(content=f"<think>Let me think about {{the}} query.</think>{_ok_json({'query': query})}")
        return Reply(content=_ok_json({"query": query}))

    if "Rewrite the sentence" in prompt:
        sentence = re.search(r"<sentence>\n(.*)\n</sentence>", prompt, re.DOTALL).group(1)
        return Reply(content=_ok_json({"paraphrase": "Put differently, " + sentence.lower()}))

    if "task instructions for a text embedding model" in prompt:  # instruction search
        count = int(re.search(r"Write (\d+) different one-sentence task instructions", prompt).group(1))
        # a careful reader: instructions the example passages themselves carry in the Qwen3 template come first
        seen = list(dict.fromkeys(re.findall(r"Instruct: ([^\n]+)\nQuery:", prompt)))
        written = [*seen, "Given a farmer's question, retrieve advice that answers it",
                   "Given a question about crops, retrieve passages with the answer"]  # fmt: skip
        return Reply(content=_ok_json({"instructions": written[:count]}))

    if "Translate the" in prompt:
        target = re.search(r"text below into ([A-Za-z ()]+?)\.", prompt).group(1)
        text = "这是一段忠实的译文。" if "Chinese" in target else "This is a faithful translation of the text."
        return Reply(content=_ok_json({"translation": text}))
    return Reply(content="unrecognised prompt")


class ScriptedLLMServer:
    """`with ScriptedLLMServer(latency=0.0) as server: server.base_url` — a threaded HTTP server."""

    def __init__(self, reply=default_reply, *, latency: float = 0.0, port: int = 0) -> None:
        self.reply = reply
        self.latency = latency  # seconds added to every request; can be changed while running
        self.requests: list[dict] = []  # {"time", "body", "status"}
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                key = json.dumps(body["messages"], sort_keys=True)
                with server._lock:
                    attempt = server._attempts.get(key, 0)
                    server._attempts[key] = attempt + 1
                reply = server.reply(body, attempt)
                with server._lock:
                    server.requests.append({"time": time.monotonic(), "body": body, "status": reply.status,
                                            "auth": self.headers.get("Authorization")})  # fmt: skip
                time.sleep(server.latency + reply.delay)
                if reply.status == 200:
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": reply.content}}],
                    }  # fmt: skip
                    data = json.dumps(payload).encode()
                else:
                    data = json.dumps({"error": {"message": reply.content}}).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    args = parser.parse_args()
    server = ScriptedLLMServer(latency=args.latency, port=args.port).start()
    print(server.base_url, flush=True)
    try:
        server._thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
