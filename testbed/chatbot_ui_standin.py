"""A stand-in for legacy Chatbot UI's server side, for the VM test (no registry reachable,
and the app's source may not be built into this repository's tests).

It speaks what backchat's verify and a browser's first request use, as the real app's
pages/api/models.ts (5248f25b) does: ``POST /api/models`` with ``{"key": ...}`` asks
``${OPENAI_API_HOST}/v1/models`` with ``Authorization: Bearer <key or OPENAI_API_KEY>``,
answers 500 when the backend refuses (the real app turns a 401 into a 500), and keeps only
the OpenAI model ids the app knows. ``GET /`` answers a page. Nothing else of the app is
here: the chat itself is not.

Run as the image's entrypoint: ``python3 -c CODE`` (the image is Debian sid with python3).
It listens on 3000, as the app does (``$PORT`` elsewhere: the gateway's test runs it beside
other servers).
"""

from pathlib import Path

CODE = r'''
import json, os, urllib.error, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = os.environ.get("OPENAI_API_HOST", "https://api.openai.com")
KEY = os.environ.get("OPENAI_API_KEY", "")
OPENAI_IDS = {"gpt-3.5-turbo", "gpt-35-turbo", "gpt-4", "gpt-4-32k"}  # types/openai.ts

class Handler(BaseHTTPRequestHandler):
    def answer(self, status, kind, data):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.answer(200, "text/html", b"<!doctype html><title>Chatbot UI (stand-in)</title>")

    def do_POST(self):
        if self.path != "/api/models":
            return self.answer(404, "text/plain", b"not found")
        asked = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        key = asked.get("key") or KEY
        request = urllib.request.Request(f"{HOST}/v1/models", headers={"Authorization": f"Bearer {key}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                listed = json.load(response).get("data", [])
        except (OSError, ValueError) as error:
            return self.answer(500, "application/json", json.dumps({"error": str(error)}).encode())
        models = [{"id": m["id"], "name": m["id"]} for m in listed if m.get("id") in OPENAI_IDS]
        self.answer(200, "application/json", json.dumps(models).encode())

ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "3000"))), Handler).serve_forever()
'''


def entrypoint() -> list[str]:
    return ["python3", "-c", CODE]


if __name__ == "__main__":  # for a look at it: python -m testbed.chatbot_ui_standin
    print(Path(__file__).read_text())
