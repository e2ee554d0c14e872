"""FakeHubServer: a loopback HTTP server that stands in for the Hugging Face Hub in tests.

This is the one fake in the test suite (the Hub cannot be reached here). It answers the endpoints
huggingface_hub 2.4 calls to create a dataset repo and upload a folder (validate-yaml, preupload
answering "regular" so contents arrive inline in the NDJSON commit, commit, repo info) and records
every request, the Authorization headers and the files committed, so tests assert on what arrived.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

_REPO = r"/api/(?P<type>datasets|models|spaces)/(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(_REPO + r"/preupload/(?P<rev>[^/?]+)"), "preupload"),
    ("POST", re.compile(_REPO + r"/commit/(?P<rev>[^/?]+)"), "commit"),
    ("GET", re.compile(_REPO + r"/tree/(?P<rev>[^/?]+)(/(?P<path>[^?]*))?"), "list_tree"),
    ("GET", re.compile(_REPO + r"(/revision/(?P<rev>[^/?]+))?"), "repo_info"),
]


@dataclass
class FakeRepo:
    repo_type: str
    visibility: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class FakeHubServer:
    """Start with `with FakeHubServer(token=...) as hub:`; point HF_ENDPOINT at `hub.url`."""

    def __init__(self, *, token: str):
        self.token = token
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[dict] = []  # method, path, endpoint name, authorized
        self.unexpected: list[str] = []
        self.bodies: list[bytes] = []  # every request body, to check what was sent
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- endpoints: (status, JSON body) ----------------------------------------------------------

    def create_repo(self, body: dict, **_) -> tuple[int, dict]:
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
        if repo_id in self.repos:
            return 409, {"error": "You already created this dataset repo", "url": self._repo_url(repo_id)}
        self.repos[repo_id] = FakeRepo(repo_type=body.get("type") or "model", visibility=body.get("visibility"))
        return 200, {"url": self._repo_url(repo_id), "name": repo_id}

    def validate_yaml(self, body: dict, **_) -> tuple[int, dict]:
        match = re.match(r"^---\n(.*?)\n---\n", body.get("content", ""), re.DOTALL)
        try:
            meta = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as err:
            return 400, {"errors": [{"message": f"invalid YAML: {err}"}]}
        if not isinstance(meta, dict):
            return 400, {"errors": [{"message": "no YAML metadata block"}]}
        return 200, {"errors": [], "warnings": []}

    def preupload(self, body: dict, *, repo: str, **_) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in body["files"]]
        return 200, {"files": files, "commitOid": self._head(repo)}

    def commit(self, raw: bytes, *, repo: str, type: str, **_) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        target = self.repos[repo]
        for line in raw.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                target.commits.append(item["value"]["summary"])
            elif item["key"] == "file":
                target.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "deletedFile":
                target.files.pop(item["value"]["path"], None)
            else:
                return 400, {"error": f"the fake hub only takes inline files, got {item['key']}"}
        oid = self._head(repo)
        return 200, {"commitUrl": f"{self._repo_url(repo)}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}

    def repo_info(self, *, repo: str, **_) -> tuple[int, dict]:
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        siblings = [{"rfilename": p} for p in sorted(self.repos[repo].files)]
        return 200, {"id": repo, "sha": self._head(repo), "private": self.repos[repo].visibility == "private", "siblings": siblings}

    def list_tree(self, *, repo: str, path: str = "", **_) -> tuple[int, list | dict]:
        """Every file of the repository (the listing `upload_folder(delete_patterns=...)` reads)."""
        if repo not in self.repos:
            return 404, {"error": "Repository not found"}
        return 200, [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                     for p, b in sorted(self.repos[repo].files.items()) if p.startswith(path)]

    def _head(self, repo: str) -> str:
        return hashlib.sha1("\n".join(self.repos[repo].commits).encode()).hexdigest()

    def _repo_url(self, repo_id: str) -> str:
        return f"{self.url}/datasets/{repo_id}"

    # -- plumbing --------------------------------------------------------------------------------

    def _dispatch(self, method: str, path: str, headers, raw: bytes) -> tuple[int, dict]:
        path = path.split("?", 1)[0]
        authorized = headers.get("Authorization") == f"Bearer {self.token}"
        for verb, pattern, name in ROUTES:
            match = pattern.fullmatch(path)
            if verb == method and match:
                with self._lock:
                    self.requests.append({"method": method, "path": path, "endpoint": name, "authorized": authorized})
                    self.bodies.append(raw)
                    if not authorized:
                        return 401, {"error": "Invalid credentials in Authorization header"}
                    args = {k: v for k, v in match.groupdict().items() if v is not None}
                    if name == "commit":
                        return self.commit(raw, **args)
                    return getattr(self, name)(json.loads(raw or b"{}"), **args) if method == "POST" else getattr(self, name)(**args)
        with self._lock:
            self.unexpected.append(f"{method} {path}")
        return 404, {"error": f"the fake hub does not implement {method} {path}"}

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, body = hub._dispatch(method, self.path, self.headers, raw)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_HEAD(self):
                self._serve("HEAD")

            def log_message(self, *args):  # keep test output clean
                pass

        return Handler
