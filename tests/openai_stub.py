"""A tiny OpenAI-compatible chat-completions server (stdlib only) for offline tests of the description generator.

`StubOpenAI` records every request and answers through `reply(class_name, attempt) -> (status, content)`, where
`attempt` counts the requests seen so far for that class (0 first). Status 200 sends `content` as the assistant message;
any other status sends an OpenAI-style error body. `delay` (seconds) is slept before answering, to provoke timeouts.
"""
from __future__ import annotations
import json, re, threading, time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CLASS_RE = re.compile(r'Class: "([^"]+)"')

def good_reply(class_name: str, attempt: int) -> tuple[int, str]:
    "Eight distinct JSON descriptions for `class_name`."
    return 200, json.dumps({"descriptions": [f"{class_name} trait {i}" for i in range(8)]})

def user_text(body: dict) -> str:
    "The text parts of the last user message of a chat-completions request body."
    content = body["messages"][-1]["content"]
    return content if isinstance(content, str) else " ".join(p["text"] for p in content if p["type"] == "text")

def image_urls(body: dict) -> list[str]:
    "The image URLs of the last user message."
    content = body["messages"][-1]["content"]
    return [] if isinstance(content, str) else [p["image_url"]["url"] for p in content if p["type"] == "image_url"]

class StubOpenAI:
    def __init__(self):
        self.requests, self.reply, self.delay, self.counts = [], good_reply, 0.0, Counter()
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.api_base = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def reset(self):
        with self.lock: self.requests.clear(); self.counts.clear()
        self.reply, self.delay = good_reply, 0.0

    def classes_asked(self) -> list[str]:
        return [CLASS_RE.search(user_text(r["body"])).group(1) for r in self.requests]

    def _answer(self, body: dict, headers: dict) -> tuple[int, dict]:
        name = CLASS_RE.search(user_text(body)).group(1)
        with self.lock:
            self.requests.append({"body": body, "headers": headers}); attempt = self.counts[name]; self.counts[name] += 1
        status, content = self.reply(name, attempt)
        if status != 200: return status, {"error": {"message": content, "type": "stub_error", "code": status}}
        msg = {"role": "assistant", "content": content}
        return 200, {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                     "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}

    def _handler(self):
        stub = self
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, out = stub._answer(body, dict(self.headers))
                time.sleep(stub.delay)
                data = json.dumps(out).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json"); self.send_header("Content-Length", str(len(data)))
                self.end_headers(); self.wfile.write(data)
            def log_message(self, *args): pass
        return Handler

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown(); self.httpd.server_close()
