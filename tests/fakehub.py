"""A fake Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub uses to push a model or a Space (whoami,
validate-yaml, create repo, preupload, commit) and to download (revision info, tree, resolve, with the Hub's
"entry not found" answer for a missing file), every request recorded. Point a process at it with `hub_env`."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

# --------------------------------------------------------------------------------------------- fake Hub

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """Model repos in `repos` and Space repos in `spaces` ({repo_id: {path: bytes}})."""

    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None):
        super().__init__(("127.0.0.1", 0), _FakeHubHandler)
        self.repos = repos or {}
        self.spaces: dict[str, dict[str, bytes]] = {}
        self.created: list[dict] = []  # the repo-creation requests, as sent
        self.requests: list[tuple[str, str, bytes]] = []
        self.failing: set[str] = set()  # repo API actions (preupload, commit, ...) that answer 500, as in an outage
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()

    def paths(self, method: str) -> list[str]:
        return [path for m, path, _ in self.requests if m == method]


class _FakeHubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeHub

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._route()

    def do_HEAD(self):
        self._route()

    def do_POST(self):
        self._route()

    def _send(self, body, status: int = 200, headers: dict | None = None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                           **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _route(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = urlsplit(self.path).path
        self.server.requests.append((self.command, path, body))
        if path == "/api/whoami-v2":
            if self.headers.get("Authorization") != "Bearer hf_fake_token":
                return self._send({"error": "Invalid credentials"}, 401)
            return self._send({"type": "user", "name": "me", "orgs": [{"name": "lab"}],
                               "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if path == "/api/validate-yaml":
            return self._send({"errors": [], "warnings": []})
        if path == "/api/repos/create":
            request = json.loads(body)
            self.server.created.append(request)
            repo = f"{request['organization']}/{request['name']}"
            self._store(request.get("type", "model")).setdefault(repo, {})
            return self._send({"url": f"{self.server.url}/{repo}", "name": repo})
        if m := re.fullmatch(r"/api/(models|spaces)/([^/]+/[^/]+)/(preupload|commit|revision|tree)/([^/]+)", path):
            return self._api(self._store(m[1].rstrip("s")), m[2], m[3], body)
        if m := re.fullmatch(r"/(spaces/)?([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            data = self._store("space" if m[1] else "model").get(m[2], {}).get(m[3])
            if data is None:  # as the Hub answers: huggingface_hub raises EntryNotFoundError
                return self._send({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound"})
            return self._send(data, headers={"Content-Type": "application/octet-stream", "X-Repo-Commit": SHA,
                                             "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})
        return self._send({"error": f"fake Hub: no route for {self.command} {path}"}, 404)

    def _store(self, kind: str) -> dict[str, dict[str, bytes]]:
        return self.server.spaces if kind == "space" else self.server.repos

    def _api(self, store: dict, repo: str, action: str, body: bytes):
        if repo not in store:
            return self._send({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        if action in self.server.failing:
            return self._send({"error": "fake Hub: outage"}, 500)
        files = store[repo]
        if action == "preupload":
            return self._send({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                         for f in json.loads(body)["files"]]})
        if action == "commit":
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._send({"commitUrl": f"{self.server.url}/{repo}/commit/{SHA}", "commitOid": SHA})
        if action == "revision":
            return self._send({"id": repo, "sha": SHA, "private": False,
                               "siblings": [{"rfilename": name} for name in files]})
        return self._send([{"type": "file", "path": name, "size": len(data),
                            "oid": hashlib.sha1(data).hexdigest()} for name, data in files.items()])


def hub_env(server: FakeHub, home: Path) -> dict:
    """A child process that talks to the fake Hub (and nothing else): online, with a token, fresh cache."""
    env = {**os.environ, "HF_ENDPOINT": server.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_fake_token",
           "HF_HOME": str(home), "NO_PROXY": "127.0.0.1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    return env


def run_python(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False)


