"""A local stand-in for the Hugging Face Hub: the HTTP endpoints huggingface_hub and datasets use to create a repo, commit
files, read repo info and tree listings, and resolve (HEAD / GET) files. Loopback only, in memory, stops by itself.

Point `HF_ENDPOINT` at `LocalHub.url` in the process that talks to it (huggingface_hub reads it at import time).
Files are committed as regular git blobs (the preupload answer is always "regular"), so no LFS or Xet storage is
involved; ETags are git blob ids, as the Hub sends for regular files.
"""

import base64
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

MAX_BODY_BYTES = 64 * 2**20


def git_blob_id(content: bytes) -> str:
    """The git object id of a blob, which the Hub sends as the ETag of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def repo_key(repo_type: str, repo_id: str) -> str:
    """How LocalHub keys a repo: its id for a model repo, "datasets/<id>" for a dataset repo."""
    return repo_id if repo_type == "models" else f"{repo_type}/{repo_id}"


def unreachable_url() -> str:
    """A loopback URL on which nothing listens, standing in for a Hub that cannot be reached."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def file_entry(path: str, content: bytes) -> dict:
    return {"type": "file", "path": path, "size": len(content), "oid": git_blob_id(content)}


def folder_entry(path: str) -> dict:
    return {"type": "directory", "path": path, "size": 0, "oid": git_blob_id(path.encode())}


class LocalHub:
    """
    In-memory model and dataset repos served over HTTP on 127.0.0.1 (a dataset repo is keyed by repo_key).

    Args:
        lifetime_s: the server shuts itself down after this many seconds.
        fail_commits: answer every commit with HTTP 500, as a Hub failing mid-upload would.
    """

    def __init__(self, lifetime_s: float = 300.0, fail_commits: bool = False):
        self.fail_commits = fail_commits
        self.snapshots = {}  # commit id -> {path: bytes}
        self.refs = {}  # repo id -> commit id of "main"
        self.requests = []  # (method, path) of every request, in order
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.timer = threading.Timer(lifetime_s, self.stop)
        self.timer.daemon = True

    def __enter__(self) -> "LocalHub":
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving; later connections are refused."""
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        """The files of `repo_id` at its latest commit."""
        return self.snapshots[self.refs[repo_id]]

    def commit(self, repo_id: str, files: dict[str, bytes]) -> str:
        """Record a commit of `files` (the whole new tree) to the main branch of `repo_id`; returns its id."""
        digest = hashlib.sha1(repo_id.encode())
        digest.update(self.refs.get(repo_id, "").encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_id(files[path]).encode())
        commit_id = digest.hexdigest()
        self.snapshots[commit_id] = dict(files)
        self.refs[repo_id] = commit_id
        return commit_id


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the few Hub endpoints huggingface_hub needs for downloads and commits."""

    timeout = 30

    def log_message(self, format, *args) -> None:
        pass

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    def do_HEAD(self) -> None:
        self.route("HEAD")

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def route(self, method: str) -> None:
        url = urlsplit(self.path)
        parts = [unquote(part) for part in url.path.strip("/").split("/")]
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        with self.hub.lock:
            self.hub.requests.append((method, url.path))
            if int(self.headers.get("Content-Length", 0)) > MAX_BODY_BYTES:
                self.send_error_json(413, None, f"Request bodies are limited to {MAX_BODY_BYTES} bytes here.")
            elif method == "POST" and parts == ["api", "repos", "create"]:
                self.create_repo()
            elif method == "POST" and parts == ["api", "validate-yaml"]:
                self.send_json(200, {"errors": [], "warnings": []})
            elif parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
                self.route_api(method, repo_key(parts[1], f"{parts[2]}/{parts[3]}"), parts[4:], query)
            elif method in ("HEAD", "GET") and parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                self.resolve(method, repo_key("datasets", f"{parts[1]}/{parts[2]}"), parts[4], "/".join(parts[5:]))
            elif method in ("HEAD", "GET") and len(parts) >= 5 and parts[2] == "resolve":
                self.resolve(method, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self.send_error_json(404, None, f"No route for {method} {url.path}.")

    def route_api(self, method: str, repo_id: str, rest: list[str], query: dict) -> None:
        if method == "GET" and (rest == [] or rest[0] == "revision" and len(rest) == 2):
            commit_id = self.resolve_revision(repo_id, rest[1] if rest else "main")
            if commit_id is not None:
                self.model_info(repo_id, commit_id)
        elif method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            commit_id = self.resolve_revision(repo_id, rest[1])
            if commit_id is not None:
                self.tree(commit_id, "/".join(rest[2:]), query.get("recursive", "false").lower() in ("1", "true"))
        elif method == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            commit_id = self.resolve_revision(repo_id, rest[1])
            if commit_id is not None:
                self.paths_info(commit_id, parse_qs(self.read_body().decode()).get("paths", []))
        elif method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            if self.resolve_revision(repo_id, rest[1]) is not None:
                self.preupload()
        elif method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            if self.resolve_revision(repo_id, rest[1]) is not None:
                self.apply_commit(repo_id)
        else:
            self.send_error_json(404, None, f"No route for {method} /api/models/{repo_id}/{'/'.join(rest)}.")

    def resolve_revision(self, repo_id: str, revision: str) -> str | None:
        """The commit id `revision` names in `repo_id`, or None after sending the Hub's 404 answer."""
        if repo_id not in self.hub.refs:
            self.send_error_json(404, "RepoNotFound", f"Repository {repo_id} not found.")
            return None
        if revision == "main":
            return self.hub.refs[repo_id]
        if revision in self.hub.snapshots:
            return revision
        self.send_error_json(404, "RevisionNotFound", f"Invalid rev id: {revision}.")
        return None

    def create_repo(self) -> None:
        payload = json.loads(self.read_body())
        repo_id = f"{payload['organization']}/{payload['name']}"
        if repo_id in self.hub.refs:
            self.send_error_json(409, None, "You already created this model repo.")
            return
        self.hub.commit(repo_id, {".gitattributes": b""})
        self.send_json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def model_info(self, repo_id: str, commit_id: str) -> None:
        files = self.hub.snapshots[commit_id]
        self.send_json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit_id,
                "private": False,
                "tags": [],
                "siblings": [{"rfilename": path} for path in sorted(files)],
            },
        )

    def tree(self, commit_id: str, folder: str, recursive: bool) -> None:
        """The files under `folder` (recursive), or its files and folders (not)."""
        prefix = f"{folder}/" if folder else ""
        files = {path: content for path, content in self.hub.snapshots[commit_id].items() if path.startswith(prefix)}
        if recursive:
            self.send_json(200, [file_entry(path, content) for path, content in sorted(files.items())])
            return
        children = {}
        for path, content in sorted(files.items()):
            name, _, below = path[len(prefix):].partition("/")
            children[prefix + name] = folder_entry(prefix + name) if below else file_entry(path, content)
        self.send_json(200, list(children.values()))

    def paths_info(self, commit_id: str, paths: list[str]) -> None:
        files = self.hub.snapshots[commit_id]
        entries = []
        for path in paths:
            if path in files:
                entries.append(file_entry(path, files[path]))
            elif any(name.startswith(f"{path}/") for name in files):
                entries.append(folder_entry(path))
        self.send_json(200, entries)

    def resolve(self, method: str, repo_id: str, revision: str, path: str) -> None:
        commit_id = self.resolve_revision(repo_id, revision)
        if commit_id is None:
            return
        files = self.hub.snapshots[commit_id]
        if path not in files:
            self.send_error_json(404, "EntryNotFound", f"{path} does not exist at {commit_id}.", commit_id)
            return
        content = files[path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", f'"{git_blob_id(content)}"')
        self.send_header("X-Repo-Commit", commit_id)
        self.end_headers()
        if method == "GET":
            self.wfile.write(content)

    def preupload(self) -> None:
        payload = json.loads(self.read_body())
        files = [{"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False} for entry in payload["files"]]
        self.send_json(200, {"files": files, "commitOid": None})

    def apply_commit(self, repo_id: str) -> None:
        lines = [json.loads(line) for line in self.read_body().splitlines() if line.strip()]
        if self.hub.fail_commits:
            self.send_error_json(500, None, "Internal Error - the commit could not be written.")
            return
        files = dict(self.hub.files(repo_id))
        for line in lines[1:]:  # lines[0] is the commit header (summary, description)
            if line["key"] != "file":
                self.send_error_json(400, None, f"This local Hub commits only regular files, not {line['key']!r}.")
                return
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        commit_id = self.hub.commit(repo_id, files)
        self.send_json(
            200, {"success": True, "commitOid": commit_id, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit_id}"}
        )

    def read_body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def send_json(self, status: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status: int, error_code: str | None, message: str, commit_id: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if error_code is not None:
            self.send_header("X-Error-Code", error_code)
        self.send_header("X-Error-Message", message)
        if commit_id is not None:
            self.send_header("X-Repo-Commit", commit_id)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
