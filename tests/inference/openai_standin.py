"""A protocol-compatible stand-in for trtllm-serve, for tests only.

TensorRT-LLM needs an NVIDIA GPU, which these machines do not have, so the trtllm
profile of the engine client is tested against this server instead: it speaks the
same wire protocol (OpenAI completions/chat SSE with include_usage, /health, and
/metrics as a JSON list of iteration stats) and emits a scripted token sequence.
It records what it received and whether a client went away mid-stream.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StandIn:
    def __init__(
        self,
        tokens: list[str],
        *,
        delay_s: float = 0.0,
        finish: str | None = "length",
        status: int = 200,
        error_body: str = "",
        logprobs: list[float] | None = None,
    ) -> None:
        self.tokens = tokens
        # one per token, sent in OpenAI's format when a request asks for logprobs (default -0.5 each)
        self.logprobs = logprobs if logprobs is not None else [-0.5] * len(tokens)
        self.delay_s = delay_s
        self.finish = finish  # None: end the stream without a finish reason (a broken server)
        self.status = status
        self.error_body = error_body
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.disconnected = threading.Event()
        self.healthy = True
        self.iteration_stats = [
            {
                "numQueuedRequests": 3,
                "numActiveRequests": 2,
                "kvCacheStats": {"maxNumBlocks": 200, "usedNumBlocks": 50, "freeNumBlocks": 150},
            }
        ]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the stream ends when the connection closes

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200 if standin.healthy else 503, b"")
                elif self.path == "/metrics":
                    self._send(200, json.dumps(standin.iteration_stats).encode(), "application/json")
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                standin.requests.append(body)
                standin.headers.append(dict(self.headers))
                if standin.status != 200:
                    self._send(standin.status, standin.error_body.encode(), "application/json")
                    return
                chat = self.path == "/v1/chat/completions"
                # chat asks with logprobs: true, completions with logprobs: <top count> (0 = sampled only)
                want_logprobs = body.get("logprobs") is not None and body.get("logprobs") is not False
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                try:
                    for i, tok in enumerate(standin.tokens):
                        last = i == len(standin.tokens) - 1
                        choice: dict[str, Any] = {"index": 0, "finish_reason": standin.finish if last else None}
                        choice |= {"delta": {"content": tok}} if chat else {"text": tok}
                        if want_logprobs:
                            lp = standin.logprobs[i]
                            if chat:
                                entry = {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": []}
                                choice["logprobs"] = {"content": [entry]}
                            else:
                                choice["logprobs"] = {
                                    "tokens": [tok],
                                    "token_logprobs": [lp],
                                    "top_logprobs": [None],
                                    "text_offset": [0],
                                }
                        self._event({"choices": [choice]})
                        time.sleep(standin.delay_s)
                    if standin.finish is not None:
                        self._event(
                            {
                                "choices": [],
                                "usage": {
                                    "prompt_tokens": 7,
                                    "completion_tokens": len(standin.tokens),
                                    "total_tokens": 7 + len(standin.tokens),
                                },
                            }
                        )
                        self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    standin.disconnected.set()

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

            def _send(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
