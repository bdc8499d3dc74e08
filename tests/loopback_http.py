"""The plumbing the tests' loopback HTTP stubs share: a JSON-answering handler and a threaded server on a free
127.0.0.1 port. Each stub (tests/test_teachers.py, test_scoring_server.py, test_code_domain.py) says which documented
response shape it copies; only that part is its own."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JsonHandler(BaseHTTPRequestHandler):
    def body(self) -> dict:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def reply(self, status: int, payload) -> None:
        """`payload` as JSON (bytes are sent as they are: a server that answers with something else)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class LoopbackServer:
    """Serves `handler` (a JsonHandler subclass) in a daemon thread; `url` is its OpenAI-style base URL (.../v1)."""

    def start(self, handler: type[JsonHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
