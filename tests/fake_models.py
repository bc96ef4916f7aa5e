"""A stand-in model provider for driving the real agent CLIs headless, offline.

It speaks just enough of three wire formats -- Anthropic's Messages API (Claude Code), OpenAI's
Responses API (Codex) and Gemini's generateContent (Gemini CLI) -- to play a scripted agent that
runs the Scribe workflow: start_new_session -> init_session -> execute_code(setup code) ->
execute_code("print(6*7)") -> a final answer. Each step is chosen from the conversation the CLI
sends (the tool results so far, the session id in them), so it is the CLI's real MCP plumbing
that carries every call. A request that asks a judge's verdict gets VERDICT. Every request is
kept in `requests` for the test to inspect (e.g. whether the first one listed Scribe's tools).

    with FakeModels() as fake: ...  fake.url, fake.requests, fake.turns
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERDICT = {"score": 9, "verdict": "correct", "rationale": "The notebook names the planted answer."}
FINAL = "The notebook shows the answer: 42."


def next_step(results: list[str], tools: list[str]) -> tuple[str, dict] | None:
    """The scripted agent: the next Scribe tool call from the results so far, or None when done."""
    def tool(suffix: str) -> str:
        return next(t for t in tools if t.endswith(suffix))

    text = "\n".join(results).replace("\\n", "\n").replace('\\"', '"')
    session = re.search(r"session_id\W+([0-9a-f]{8})", text)
    if not results:
        return tool("start_new_session"), {"experiment_name": "audit"}
    if len(results) == 1:
        return tool("init_session"), {}
    if len(results) == 2:
        setup = text.split("```python\n", 1)[1].split("```", 1)[0]
        return tool("execute_code"), {"session_id": session.group(1), "code": setup}
    if len(results) == 3:
        return tool("execute_code"), {"session_id": session.group(1), "code": "print(6*7)"}
    return None


def _satisfying(schema: dict | None):
    """A value of the JSON schema's shape: the first enum value, else a plain one of its type."""
    schema = schema or {}
    if schema.get("enum"):
        return schema["enum"][0]
    kind = str(schema.get("type", "object")).lower()
    if kind == "object":
        return {key: _satisfying(sub) for key, sub in (schema.get("properties") or {}).items()}
    return {"string": "ok", "integer": 1, "number": 1, "boolean": False, "array": []}.get(kind)


def _judging(text: str) -> bool:
    return "grading a blind interpretability audit" in text


class FakeModels:
    def __init__(self):
        self.requests: list[dict] = []  # {"api", "path", "body"}
        self.turns: list[dict] = []  # main-loop requests: {"api", "tools"}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeModels:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # model lists and the like: nothing to offer
                self._json({"data": [], "models": []})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                path = self.path.split("?")[0]
                if path.endswith("/messages"):
                    fake._anthropic(self, body)
                elif path.endswith("/responses"):
                    fake._openai(self, body)
                elif ":streamGenerateContent" in path or ":generateContent" in path:
                    fake._gemini(self, body, stream=":streamGenerateContent" in path)
                elif ":countTokens" in path or path.endswith("/count_tokens"):
                    self._json({"totalTokens": 10, "input_tokens": 10})
                else:
                    self._json({"error": {"message": f"the fake has no {path}"}}, 404)

            def _json(self, payload, status=200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def sse(self, events: list[tuple[str | None, dict]]):
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                for name, data in events:
                    head = f"event: {name}\n" if name else ""
                    self.wfile.write(f"{head}data: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()
                self.close_connection = True

        return Handler

    def _decide(self, api: str, body: dict, tools: list[str], results: list[str], prompt: str):
        self.requests.append({"api": api, "body": body})
        if _judging(prompt):
            return None, json.dumps(VERDICT)
        if not any("start_new_session" in t for t in tools):
            return None, "OK"  # the CLI's own side requests (titles, checks): plain text
        self.turns.append({"api": api, "tools": tools})
        step = next_step(results, tools)
        return (step, None) if step else (None, FINAL)

    # -- Anthropic Messages (Claude Code) ------------------------------------------------------

    def _anthropic(self, handler, body: dict) -> None:
        results, texts = [], []
        for message in body.get("messages", []):
            content = message["content"]
            blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for block in blocks:
                if block.get("type") == "tool_result":
                    inner = block.get("content")
                    results.append(inner if isinstance(inner, str) else
                                   "".join(b.get("text", "") for b in inner or [] if isinstance(b, dict)))
                elif block.get("type") == "text":
                    texts.append(block["text"])
        tools = [t.get("name", "") for t in body.get("tools", [])]
        step, text = self._decide("anthropic", body, tools, results, "\n".join(texts))
        message_id = f"msg_{uuid.uuid4().hex[:12]}"
        usage = {"input_tokens": 10, "output_tokens": 5}
        if step:
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:12]}", "name": step[0], "input": {}}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(step[1])}
            stop = "tool_use"
        else:
            block, delta, stop = {"type": "text", "text": ""}, {"type": "text_delta", "text": text}, "end_turn"
        if not body.get("stream"):
            full = ({**block, "input": step[1]} if step else {"type": "text", "text": text})
            return handler._json({"id": message_id, "type": "message", "role": "assistant", "model": body.get("model"),
                                  "content": [full], "stop_reason": stop, "stop_sequence": None, "usage": usage})
        handler.sse([
            ("message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": body.get("model"), "content": [],
                "stop_reason": None, "stop_sequence": None, "usage": usage}}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                               "usage": {"output_tokens": 5}}),
            ("message_stop", {"type": "message_stop"}),
        ])

    # -- OpenAI Responses (Codex) --------------------------------------------------------------

    def _openai(self, handler, body: dict) -> None:
        results, texts = [], []
        items = body.get("input", [])
        for item in items if isinstance(items, list) else [{"type": "message", "content": items}]:
            if item.get("type") == "function_call_output":
                output = item.get("output")
                results.append(output if isinstance(output, str) else json.dumps(output))
            elif item.get("type") == "message":
                content = item.get("content")
                texts += [content] if isinstance(content, str) else [c.get("text", "") for c in content or []]
        texts.append(str(body.get("instructions", "")))
        # Codex groups an MCP server's tools in a namespace (e.g. mcp__scribe): "namespace.name" here.
        tools = [f"{t['name']}.{inner['name']}" if t.get("type") == "namespace" else t.get("name", "")
                 for t in body.get("tools", []) for inner in (t.get("tools") or [t])]
        step, text = self._decide("openai", body, tools, results, "\n".join(texts))
        response_id = f"resp_{uuid.uuid4().hex[:12]}"
        if step:
            namespace, _, name = step[0].rpartition(".")
            item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex[:12]}", "call_id": f"call_{uuid.uuid4().hex[:12]}",
                    "name": name, "arguments": json.dumps(step[1]), "status": "completed",
                    **({"namespace": namespace} if namespace else {})}
        else:
            item = {"type": "message", "id": f"msg_{uuid.uuid4().hex[:12]}", "role": "assistant", "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}]}
        usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 5,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}
        response = {"id": response_id, "object": "response", "status": "completed", "model": body.get("model"),
                    "output": [item], "usage": usage}
        handler.sse([
            ("response.created", {"type": "response.created", "response": {**response, "status": "in_progress",
                                                                          "output": []}}),
            ("response.output_item.added", {"type": "response.output_item.added", "output_index": 0, "item": item}),
            ("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": item}),
            ("response.completed", {"type": "response.completed", "response": response}),
        ])

    # -- Gemini generateContent (Gemini CLI) ---------------------------------------------------

    def _gemini(self, handler, body: dict, stream: bool) -> None:
        results, texts = [], []
        for content in body.get("contents", []):
            for part in content.get("parts", []):
                if "functionResponse" in part:
                    results.append(json.dumps(part["functionResponse"].get("response")))
                elif "text" in part:
                    texts.append(part["text"])
        tools = [d.get("name", "") for t in body.get("tools", []) for d in t.get("functionDeclarations", [])]
        config = body.get("generationConfig") or {}
        if config.get("responseMimeType") == "application/json" and not tools:  # the CLI's own checks (routing)
            self.requests.append({"api": "gemini", "body": body})
            part = {"text": json.dumps(_satisfying(config.get("responseJsonSchema") or config.get("responseSchema")))}
        else:
            step, text = self._decide("gemini", body, tools, results, "\n".join(texts))
            part = {"functionCall": {"name": step[0], "args": step[1]}} if step else {"text": text}
        chunk = {"candidates": [{"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}],
                 "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, "totalTokenCount": 15},
                 "modelVersion": "fake"}
        if stream:
            handler.sse([(None, chunk)])
        else:
            handler._json(chunk)
