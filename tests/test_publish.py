"""`factory publish` against a fake Hub on 127.0.0.1 that speaks the part of the Hub API the real
huggingface_hub client uses (repo create/info/tree/refs/commits, preupload, LFS batch + PUT + verify,
NDJSON commit with parentCommit, branch, tag), keeps files per commit and records every request.
Parquet files are answered "lfs" as the real Hub does; Xet is disabled in the client, since the fake
does not speak Xet's storage protocol. Also the run lock of scheduled builds."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.utils import disable_progress_bars
from huggingface_hub.utils.sha import git_hash

from factory.build.lock import LockHeld, RunLock, lock_path
from factory.build.output import DATA_FILE_GLOB
from factory.publish.hub import PublishError, cli_publish, plan_publish, publish

# huggingface_hub's LFS upload passes the file as `data=`, which its HTTP client deprecates; not this code's to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>' to upload raw bytes:DeprecationWarning")

TOKEN = "hf_testSECRET123"
REPO = "org/reasoning"
CONFIGS = ("traces", "filtered", "sft", "prm")
FOREIGN_CHANGE = "The branch was updated since you opened this page. Please refresh and try again."


# ---- the fake Hub ------------------------------------------------------------------------------


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **payload):
        super().__init__(message)
        self.status, self.message, self.code, self.payload = status, message, code, payload


@dataclass
class Blob:
    content: bytes
    lfs: bool


@dataclass
class Commit:
    oid: str
    parent: str | None
    tree: dict[str, Blob]
    title: str


@dataclass
class Repo:
    private: bool | None
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict
    headers: dict[str, str]  # lower-case names
    body: bytes


class FakeHub:
    """In-memory Hub. `hooks[name]` runs once, outside the state lock, when a request of that route
    arrives and before it is answered: a hook may itself call the server (it is threaded)."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Recorded] = []
        self.hooks: dict[str, object] = {}
        self.lock = threading.RLock()
        self.serial = 0
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.handle(self, "GET")

            def do_POST(self):
                hub.handle(self, "POST")

            def do_PUT(self):
                hub.handle(self, "PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # -- transport

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        body = read_body(req)
        url = urlsplit(req.path)
        headers = {k.lower(): v for k, v in req.headers.items()}
        with self.lock:
            self.requests.append(Recorded(method, url.path, parse_qs(url.query), headers, body))
        segments = [unquote(s) for s in url.path.strip("/").split("/")]
        try:
            route, handler, args = self.route(method, segments)
            hook = self.hooks.pop(route, None)
            if hook is not None:
                hook()
            if route.startswith("api") and not headers.get("authorization", "").startswith("Bearer hf_"):
                raise HubError(401, "Invalid credentials in Authorization header")
            with self.lock:
                status, payload = handler(*args, body=body)
            extra = {}
        except HubError as err:
            status, payload, extra = err.status, {"error": err.message, **err.payload}, ({"X-Error-Code": err.code} if err.code else {})
        data = json.dumps(payload).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        for name, value in extra.items():
            req.send_header(name, value)
        req.end_headers()
        req.wfile.write(data)

    def route(self, method: str, s: list[str]):
        """(route name, handler, args) for a request; route names starting with "api" need the token."""
        if method == "POST" and s == ["api", "repos", "create"]:
            return "api:create", self.create_repo, ()
        if method == "POST" and s == ["api", "validate-yaml"]:
            return "api:validate-yaml", lambda body: (200, {"errors": [], "warnings": []}), ()
        if len(s) >= 4 and s[0] == "api" and s[1] in ("datasets", "models"):
            key, rest = f"{s[1]}/{s[2]}/{s[3]}", s[4:]
            table = {
                ("GET", ""): self.info,
                ("GET", "revision"): self.info,
                ("GET", "tree"): self.tree_listing,
                ("GET", "refs"): self.refs,
                ("GET", "commits"): self.commits,
                ("POST", "preupload"): self.preupload,
                ("POST", "commit"): self.commit,
                ("POST", "branch"): self.create_branch,
                ("POST", "tag"): self.create_tag,
            }
            handler = table.get((method, rest[0] if rest else ""))
            if handler:
                return f"api:{rest[0] if rest else 'info'}", handler, (key, *rest[1:])
        if method == "POST" and len(s) == 7 and s[3:] == ["info", "lfs", "objects", "batch"] and s[2].endswith(".git"):
            return "api:lfs-batch", self.lfs_batch, ()
        if method == "PUT" and len(s) == 2 and s[0] == "lfs-upload":  # a presigned storage URL: no token
            return "lfs-upload", self.lfs_upload, (s[1],)
        if method == "POST" and s == ["lfs-verify"]:
            return "api:lfs-verify", self.lfs_verify, ()
        raise HubError(404, f"no route {method} /{'/'.join(s)}")

    # -- state helpers

    def repo(self, key: str) -> Repo:
        if key not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[key]

    def resolve(self, repo: Repo, rev: str) -> Commit:
        oid = repo.branches.get(rev) or repo.tags.get(rev)
        if oid is None:
            matches = [c for c in repo.commits if len(rev) >= 7 and c.startswith(rev)]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[oid]

    def new_commit(self, repo: Repo, parent: str | None, tree: dict[str, Blob], title: str) -> Commit:
        self.serial += 1
        oid = hashlib.sha1(f"{parent}{self.serial}{sorted(tree)}{title}".encode()).hexdigest()
        repo.commits[oid] = Commit(oid, parent, tree, title)
        return repo.commits[oid]

    # -- endpoints

    def create_repo(self, body: bytes):
        payload = json.loads(body)
        key = f"{payload.get('type', 'model')}s/{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{key}"
        if key in self.repos:
            raise HubError(409, "You already created this dataset repo", url=url)  # the real Hub names it too
        repo = self.repos[key] = Repo(private=payload.get("visibility") == "private")
        attributes = Blob(b"*.parquet filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
        repo.branches["main"] = self.new_commit(repo, None, {".gitattributes": attributes}, "initial commit").oid
        return 200, {"url": url, "name": key.split("/", 1)[1]}

    def info(self, key: str, rev: str = "main", *, body: bytes):
        repo = self.repo(key)
        commit = self.resolve(repo, rev)
        return 200, {
            "id": key.split("/", 1)[1],
            "sha": commit.oid,
            "private": repo.private,
            "siblings": [{"rfilename": p} for p in commit.tree],
        }

    def tree_listing(self, key: str, rev: str, *path: str, body: bytes):
        commit = self.resolve(self.repo(key), rev)
        entries, folders = [], set()
        for name, blob in sorted(commit.tree.items()):
            parts = name.split("/")
            folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
            entry = {"type": "file", "oid": git_hash(blob.content), "size": len(blob.content), "path": name}
            if blob.lfs:
                entry["lfs"] = {"oid": hashlib.sha256(blob.content).hexdigest(), "size": len(blob.content), "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": folder} for folder in sorted(folders)]
        return 200, entries  # recursive listing of the whole tree, one page

    def refs(self, key: str, *, body: bytes):
        repo = self.repo(key)

        def refs_of(kind: str, names: dict[str, str]) -> list[dict]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in names.items()]

        return 200, {"branches": refs_of("heads", repo.branches), "converts": [], "tags": refs_of("tags", repo.tags), "pullRequests": []}

    def commits(self, key: str, rev: str, *, body: bytes):
        repo = self.repo(key)
        commit, listing = self.resolve(repo, rev), []
        while commit is not None:
            listing.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": "",
                    "authors": [{"user": "someone"}],
                    "date": "2026-01-01T00:00:00.000Z",
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return 200, listing

    def preupload(self, key: str, rev: str, *, body: bytes):
        head = self.resolve(self.repo(key), rev)
        files = []
        for file in json.loads(body)["files"]:
            lfs = file["path"].endswith(".parquet")
            blob = head.tree.get(file["path"])
            oid = None if blob is None else (hashlib.sha256(blob.content).hexdigest() if lfs else git_hash(blob.content))
            files.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return 200, {"files": files, "commitOid": head.oid}

    def lfs_batch(self, *, body: bytes):
        objects = []
        for obj in json.loads(body)["objects"]:
            answer = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:
                answer["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/lfs-verify"},
                }
            objects.append(answer)
        return 200, {"transfer": "basic", "objects": objects}

    def lfs_upload(self, oid: str, *, body: bytes):
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, "content does not match its oid")
        self.lfs[oid] = body
        return 200, {}

    def lfs_verify(self, *, body: bytes):
        obj = json.loads(body)
        if len(self.lfs.get(obj["oid"], b"")) != obj["size"] or obj["oid"] not in self.lfs:
            raise HubError(404, "object not uploaded")
        return 200, {}

    def commit(self, key: str, rev: str, *, body: bytes):
        repo = self.repo(key)
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = lines[0]["value"]
        head = repo.commits[repo.branches[rev]]
        if header.get("parentCommit") and not head.oid.startswith(header["parentCommit"]):
            raise HubError(412, FOREIGN_CHANGE)
        tree = dict(head.tree)
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                tree[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    raise HubError(400, f"LFS object {value['oid']} was not uploaded")
                tree[value["path"]] = Blob(self.lfs[value["oid"]], lfs=True)
            elif line["key"] == "deletedFile":
                if value["path"] not in tree:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del tree[value["path"]]
            else:
                raise HubError(400, f"unsupported operation {line['key']}")
        commit = self.new_commit(repo, head.oid, tree, header["summary"])
        repo.branches[rev] = commit.oid
        return 200, {"commitUrl": f"{self.url}/{key}/commit/{commit.oid}", "commitOid": commit.oid, "success": True}

    def create_branch(self, key: str, branch: str, *, body: bytes):
        repo = self.repo(key)
        if branch in repo.branches:
            raise HubError(409, "Reference already exists")
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self.resolve(repo, start).oid
        return 200, {}

    def create_tag(self, key: str, rev: str, *, body: bytes):
        repo = self.repo(key)
        tag = json.loads(body)["tag"]
        if tag in repo.tags:
            raise HubError(409, "Tag already exists")
        repo.tags[tag] = self.resolve(repo, rev).oid
        return 200, {}

    # -- what tests look at

    def files(self, repo_id: str = REPO, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[f"datasets/{repo_id}"]
        return {path: blob.content for path, blob in self.resolve(repo, rev).tree.items()}

    def history(self, repo_id: str = REPO, branch: str = "main") -> list[Commit]:
        """Commits of the branch, oldest first."""
        repo = self.repos[f"datasets/{repo_id}"]
        chain, oid = [], repo.branches[branch]
        while oid:
            chain.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return chain[::-1]

    def commit_requests(self) -> list[list[dict]]:
        """The NDJSON lines of every commit request."""
        return [
            [json.loads(line) for line in r.body.decode().splitlines()] for r in self.requests if r.path.split("/")[-2:-1] == ["commit"]
        ]


def read_body(req: BaseHTTPRequestHandler) -> bytes:
    if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(req.rfile.readline().split(b";")[0], 16)
            chunk = req.rfile.read(size)
            req.rfile.readline()
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk)
    return req.rfile.read(int(req.headers.get("Content-Length") or 0))


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub, and an environment where the real client talks to it with the sentinel token.
    The client reads several settings once at import, so those are set on its constants too."""
    server = FakeHub()
    home = tmp_path / "hf-home"
    for name, value in {
        "HF_TOKEN": TOKEN,
        "HF_ENDPOINT": server.url,
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
    }.items():
        monkeypatch.setenv(name, value)
    for name, value in {
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "ENDPOINT": server.url,
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }.items():
        monkeypatch.setattr(constants, name, value)
    with disable_progress_bars():
        yield server
    server.close()


def data_path(config: str, index: int, fingerprint: str) -> str:
    """A data file's name as `factory build` writes it: its shard and a digest of its rows."""
    return f"data/{config}/train-{index:05d}-{hashlib.sha256(f'{config}{index}{fingerprint}'.encode()).hexdigest()[:12]}.parquet"


def write_build(root: Path, fingerprint: str, shards: int, *, stray: bool = True) -> Path:
    """A finished build as `factory build` leaves it: data files, manifest, card, resume state, and user files."""
    files: dict[str, list[str]] = {config: [] for config in (*CONFIGS, "rejected")}
    for config, count in [*((c, shards) for c in CONFIGS), ("rejected", 1)]:
        for index in range(count):
            path = data_path(config, index, fingerprint)
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"text": [f"{config} {index} {fingerprint} row {i}" for i in range(3)]}), root / path)
            files[config].append(path)
    manifest = {
        "fingerprint": fingerprint,
        "spec_hash": "spec0123",
        "code_version": "0.1.0+test",
        "accepted": 9,
        "problems": 12,
        "files": files,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    configs = "".join(f"- config_name: {c}\n  data_files:\n  - split: train\n    path: data/{c}/{DATA_FILE_GLOB}\n" for c in CONFIGS)
    (root / "README.md").write_text(f"---\ntask_categories:\n- text-generation\nconfigs:\n{configs}---\n\n# Build {fingerprint}\n")
    (root / "_build").mkdir(exist_ok=True)
    (root / "_build" / "state.json").write_text(json.dumps({"spec_hash": "spec0123", "HF_HOME": "not a secret"}))
    if stray:
        (root / "notes.txt").write_text("my own notes, not part of the dataset\n")
        (root / "data" / "traces" / "scratch.parquet").write_bytes(b"a user's own file in data/")
    return root


def published_paths(root: Path) -> set[str]:
    manifest = json.loads((root / "manifest.json").read_text())
    return {"README.md", "manifest.json", *(p for paths in manifest["files"].values() for p in paths)}


@pytest.fixture
def build_a(tmp_path):
    return write_build(tmp_path / "out", "aaaaaaaaaaaa", shards=3)


def rebuild(root: Path, fingerprint: str, shards: int) -> Path:
    """The same output directory rebuilt: the earlier build's data files are gone, as `factory build` leaves it."""
    for path in root.glob(f"data/*/{DATA_FILE_GLOB}"):
        path.unlink()
    return write_build(root, fingerprint, shards)


# ---- publishing --------------------------------------------------------------------------------


def test_one_commit_holds_exactly_the_build(hub, build_a, capsys):
    result = publish(build_a, REPO)

    initial, commit = hub.history()
    assert set(hub.files()) == published_paths(build_a) | {".gitattributes"}
    for path in published_paths(build_a):
        assert hub.files()[path] == (build_a / path).read_bytes()
    (request,) = hub.commit_requests()
    assert request[0]["value"]["parentCommit"] == initial.oid
    sent = {line["value"]["path"]: line["key"] for line in request[1:]}
    assert set(sent) == published_paths(build_a)  # nothing of _build/, no user file
    assert {key for path, key in sent.items() if path.endswith(".parquet")} == {"lfsFile"}
    assert sent["README.md"] == sent["manifest.json"] == "file"
    assert len([r for r in hub.requests if r.method == "PUT"]) == len(published_paths(build_a)) - 2  # every parquet went by LFS

    assert result["commit"] == commit.oid and result["tag"] == "build-aaaaaaaaaaaa"
    refs = HfApi(endpoint=hub.url).list_repo_refs(REPO, repo_type="dataset")
    assert {t.name: t.target_commit for t in refs.tags} == {"build-aaaaaaaaaaaa": commit.oid}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert commit.oid in last and "build-aaaaaaaaaaaa" in last


def test_a_rebuild_replaces_the_stale_data_files_in_the_same_commit(hub, build_a):
    publish(build_a, REPO)
    other = HfApi(endpoint=hub.url)  # a user's own files in the repo: publish must keep them
    other.upload_file(path_or_fileobj=b"mine", path_in_repo="data/traces/user-notes.parquet", repo_id=REPO, repo_type="dataset")
    other.upload_file(path_or_fileobj=b"# analysis\n", path_in_repo="extra/analysis.md", repo_id=REPO, repo_type="dataset")
    old_data = {p for p in published_paths(build_a) if p.startswith("data/")}
    build_b = rebuild(build_a, "bbbbbbbbbbbb", shards=2)
    head = hub.history()[-1].oid

    result = publish(build_b, REPO)

    assert len(hub.history()) == 5  # initial, build A, two user commits, build B: one commit for the whole rebuild
    request = hub.commit_requests()[-1]
    assert request[0]["value"]["parentCommit"] == head
    deleted = {line["value"]["path"] for line in request if line["key"] == "deletedFile"}
    added = {line["value"]["path"] for line in request[1:] if line["key"] in ("file", "lfsFile")}
    assert deleted == old_data == set(result["deletions"])
    assert added == published_paths(build_b)
    assert set(hub.files()) == published_paths(build_b) | {".gitattributes", "data/traces/user-notes.parquet", "extra/analysis.md"}
    tags = {t.name: t.target_commit for t in other.list_repo_refs(REPO, repo_type="dataset").tags}
    assert tags["build-bbbbbbbbbbbb"] == hub.history()[-1].oid == result["commit"]
    assert tags["build-aaaaaaaaaaaa"] == hub.history()[1].oid  # the earlier build stays reachable by its tag


def test_a_branch_that_moved_fails_cleanly_and_a_rerun_succeeds(hub, build_a):
    publish(build_a, REPO)
    build_b = rebuild(build_a, "bbbbbbbbbbbb", shards=2)

    def someone_else_commits():  # between publish's read of the branch and its commit
        HfApi(endpoint=hub.url).upload_file(path_or_fileobj=b"hi\n", path_in_repo="NOTES.md", repo_id=REPO, repo_type="dataset")

    hub.hooks["api:preupload"] = someone_else_commits
    with pytest.raises(PublishError) as err:
        publish(build_b, REPO)
    message = str(err.value)
    assert "\n" not in message and "moved" in message and "rerun publish" in message
    assert [c.title for c in hub.history()][1:] == [
        "Publish build aaaaaaaaaaaa: 9 traces accepted of 12 problems",
        "Upload NOTES.md with huggingface_hub",
    ]
    assert "build-bbbbbbbbbbbb" not in hub.repos[f"datasets/{REPO}"].tags
    assert not {p for p in published_paths(build_b) if p.startswith("data/")} & set(hub.files())  # nothing of b landed

    result = publish(build_b, REPO)
    assert hub.history()[-2].title.startswith("Upload NOTES.md") and result["commit"] == hub.history()[-1].oid
    assert "NOTES.md" in hub.files()


def test_the_token_is_sent_but_never_written_or_printed(hub, build_a, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    publish(build_a, REPO)
    publish(build_a, REPO, dry_run=True)
    publish(build_a, REPO)  # nothing changed: says so
    (build_a / "README.md").write_text((build_a / "README.md").read_text() + "\nedited\n")
    with pytest.raises(PublishError) as err:  # the tag exists and the build changed
        publish(build_a, REPO)
    with pytest.raises(SystemExit) as exit_:
        cli_publish([str(build_a), "--repo-id", REPO])
    printed = capsys.readouterr()
    for text in (printed.out, printed.err, caplog.text, str(err.value), str(exit_.value.code)):
        assert TOKEN not in text
    for path in Path(build_a).parent.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    api_calls = [r for r in hub.requests if r.path.startswith(("/api/", "/datasets/"))]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    uploads = [r for r in hub.requests if r.method == "PUT"]
    assert uploads and not any("authorization" in r.headers for r in uploads)  # storage URLs never get the token


def test_dry_run_only_reads_and_prints_the_operations(hub, build_a, capsys):
    result = publish(build_a, REPO, dry_run=True)
    out = capsys.readouterr().out
    assert f"create repo  {REPO}" in out and "parent       none (new repo)" in out and "tag          build-aaaaaaaaaaaa" in out
    assert {line.split()[1] for line in out.splitlines() if line.strip().startswith("add ")} == published_paths(build_a)
    assert result["dry_run"] and result["commit"] is None and not hub.repos
    assert {r.method for r in hub.requests} == {"GET"}

    publish(build_a, REPO)
    old_data = {p for p in published_paths(build_a) if p.startswith("data/")}
    build_b = rebuild(build_a, "bbbbbbbbbbbb", shards=2)
    before, state = len(hub.requests), (hub.history(), dict(hub.repos[f"datasets/{REPO}"].tags))
    publish(build_b, REPO, dry_run=True)
    out = capsys.readouterr().out
    deleted = {line.split()[1] for line in out.splitlines() if line.strip().startswith("delete ")}
    assert deleted == old_data and not deleted & published_paths(build_b)
    assert f"parent       {hub.history()[-1].oid} on main" in out and "nothing was changed" in out
    assert {r.method for r in hub.requests[before:]} == {"GET"}
    assert (hub.history(), dict(hub.repos[f"datasets/{REPO}"].tags)) == state


def test_plan_lists_additions_deletions_parent_and_tag(hub, build_a):
    api = HfApi(endpoint=hub.url)
    publish(build_a, REPO, api=api)
    (build_a / "README.md").write_text((build_a / "README.md").read_text() + "\nedited\n")
    plan = plan_publish(build_a, api, REPO, None, tag="v2")
    assert plan.additions == ["README.md"] and plan.deletions == []
    assert plan.parent_commit == hub.history()[-1].oid and plan.tag == "v2" and plan.tag_target is None


def test_an_existing_tag_is_kept_unless_nothing_changed(hub, build_a, capsys):
    publish(build_a, REPO)
    commits = len(hub.history())
    result = publish(build_a, REPO)
    assert result["action"] == "nothing" and len(hub.history()) == commits
    assert "nothing to publish" in capsys.readouterr().out

    (build_a / "README.md").write_text((build_a / "README.md").read_text() + "\nedited\n")
    with pytest.raises(PublishError, match="tag build-aaaaaaaaaaaa already exists.*pass --tag"):
        publish(build_a, REPO)
    assert len(hub.history()) == commits
    result = publish(build_a, REPO, tag="build-aaaaaaaaaaaa-card2")
    assert result["commit"] == hub.history()[-1].oid and result["additions"] == ["README.md"]


def test_cli_publishes_to_a_new_branch_of_a_private_repo(hub, build_a, capsys):
    cli_publish([str(build_a), "--repo-id", REPO, "--private", "--revision", "nightly", "--tag", "nightly-1"])
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert json.loads(create.body)["visibility"] == "private" and json.loads(create.body)["type"] == "dataset"
    assert len(hub.history(branch="main")) == 1  # main untouched
    nightly = hub.history(branch="nightly")
    assert len(nightly) == 2 and set(hub.files(rev="nightly")) == published_paths(build_a) | {".gitattributes"}
    assert hub.repos[f"datasets/{REPO}"].tags == {"nightly-1": nightly[-1].oid}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert nightly[-1].oid in last and "tag nightly-1" in last and "@nightly" in last


def test_an_unfinished_build_is_refused_before_any_request(hub, tmp_path):
    out = write_build(tmp_path / "out", "cccccccccccc", shards=2)
    (out / "manifest.json").unlink()
    with pytest.raises(PublishError) as err:
        publish(out, REPO)
    assert "\n" not in str(err.value) and "manifest.json" in str(err.value)

    out = write_build(tmp_path / "out2", "cccccccccccc", shards=2)
    (out / data_path("sft", 1, "cccccccccccc")).unlink()
    with pytest.raises(SystemExit) as exit_:
        cli_publish([str(out), "--repo-id", REPO])
    message = str(exit_.value.code)
    assert message.startswith("factory publish: ") and "\n" not in message and data_path("sft", 1, "cccccccccccc") in message

    out = write_build(tmp_path / "out3", "cccccccccccc", shards=2)
    card = (out / "README.md").read_text().replace(f"path: data/sft/{DATA_FILE_GLOB}", "path: data/sft/train-*-dddddddddddd.parquet")
    (out / "README.md").write_text(card)
    with pytest.raises(PublishError, match="matches no file manifest.json lists"):
        publish(out, REPO)
    assert hub.requests == []


def test_a_manifest_cannot_publish_files_outside_the_build(hub, tmp_path):
    out = write_build(tmp_path / "out", "cccccccccccc", shards=1)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["sft"].append("../secret.txt")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PublishError, match="not a relative path under data/"):
        publish(out, REPO)


# ---- the run lock ------------------------------------------------------------------------------


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    path = lock_path(tmp_path / "out")
    with RunLock(path):
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(LockHeld) as err:
            RunLock(path).acquire()
        assert f"pid {os.getpid()}" in str(err.value) and socket.gethostname() in str(err.value) and holder["started"] in str(err.value)
    assert not path.exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": child.pid, "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}))
    logs: list[str] = []
    with RunLock(path, log=logs.append):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(logs) == 1 and "stale" in logs[0] and str(child.pid) in logs[0]
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_lock_from_another_host_is_taken_over_only_after_stale_after(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 1, "host": "another-pod", "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(LockHeld, match="pid 1 on host another-pod since 2026-01-01"):
        RunLock(path).acquire()
    with RunLock(path, stale_after=3600, log=lambda line: None):
        assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_a_lock_still_being_written_is_held_until_it_is_old(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text("")
    with pytest.raises(LockHeld, match="still writing"):
        RunLock(path).acquire()
    old = time.time() - 120
    os.utime(path, (old, old))
    with RunLock(path, log=lambda line: None):
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_the_lock_is_released_after_an_exception_and_never_frees_another_runs_lock(tmp_path):
    path = tmp_path / "run.lock"
    with pytest.raises(RuntimeError, match="build failed"):
        with RunLock(path):
            raise RuntimeError("build failed")
    assert not path.exists()

    lock = RunLock(path)
    lock.acquire()
    path.write_text(json.dumps({"pid": 1, "host": "another-pod", "started": "2026-01-01T00:00:00+00:00"}))  # taken over meanwhile
    lock.release()
    assert json.loads(path.read_text())["host"] == "another-pod"


# ---- the scheduled job -----------------------------------------------------------------------------


def test_a_scheduled_run_builds_incrementally_publishes_only_what_changed_and_never_overlaps(hub, tmp_path, tiny_adapter, monkeypatch):
    from functools import partial

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import scheduled_build

    from factory.build.command import build
    from factory.build.runner import run_in_process
    from factory.synthetic.problems import SyntheticConfig, generate

    monkeypatch.setattr(scheduled_build, "build", partial(build, runner=partial(run_in_process, adapter=tiny_adapter), log=lambda _: None))
    pool = generate(6, seed=4, config=SyntheticConfig(2, 3))
    source, out = tmp_path / "pool.jsonl", tmp_path / "builds" / "nightly"
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        json.dumps(
            {"source": {"kind": "local", "path": str(source)}, "filters": {"answer_match": False, "step_labels": False, "min_steps": 0}}
        )
    )

    def write_pool(problems) -> None:
        source.write_text("".join(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n" for p in problems))

    write_pool(pool[:4])
    first = scheduled_build.scheduled_run(str(spec), out, REPO)
    assert first["published"] and len(hub.history()) == 2  # the repo's first commit and the build's
    assert scheduled_build.scheduled_run(str(spec), out, REPO) == {"published": False, "fingerprint": first["fingerprint"]}
    assert len(hub.history()) == 2
    write_pool(pool)  # the pool grew: the next run builds the new problems and publishes a new tagged revision
    grown = scheduled_build.scheduled_run(str(spec), out, REPO)
    assert grown["published"] and grown["fingerprint"] != first["fingerprint"] and len(hub.history()) == 3
    assert f"build-{grown['fingerprint']}" in hub.repos[f"datasets/{REPO}"].tags

    with RunLock(lock_path(out)):  # another run still holds the output: this one exits at once, non-zero, naming it
        with pytest.raises(SystemExit) as exit_:
            scheduled_build.main(["--spec", str(spec), "--output", str(out), "--repo-id", REPO])
    assert str(exit_.value.code).startswith("scheduled build: ") and f"pid {os.getpid()}" in str(exit_.value.code)
    assert len(hub.history()) == 3


# ---- crashes mid-publish (#29): a rerun finishes the job without a second commit ---------------


def test_a_publisher_killed_between_its_commit_and_its_tag_is_finished_by_a_rerun(hub, build_a, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies with the commit made and the tag not yet

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_tag", killed)
        with pytest.raises(KeyboardInterrupt):
            publish(build_a, REPO)
    commits = [c.title for c in hub.history()]
    assert commits[-1].startswith("Publish build aaaaaaaaaaaa") and "build-aaaaaaaaaaaa" not in hub.repos[f"datasets/{REPO}"].tags
    result = publish(build_a, REPO)  # the rerun only tags what the branch already holds
    assert [c.title for c in hub.history()] == commits
    assert hub.repos[f"datasets/{REPO}"].tags["build-aaaaaaaaaaaa"] == hub.history()[-1].oid == result["commit"]


def test_a_scheduled_run_killed_after_the_tag_and_before_its_marker_publishes_nothing_twice(hub, tmp_path, tiny_adapter, monkeypatch):
    from functools import partial

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))
    import scheduled_build

    from factory.build.command import build
    from factory.build.runner import run_in_process
    from factory.synthetic.problems import generate

    monkeypatch.setattr(scheduled_build, "build", partial(build, runner=partial(run_in_process, adapter=tiny_adapter), log=lambda _: None))
    source, out, spec = tmp_path / "pool.jsonl", tmp_path / "nightly", tmp_path / "spec.yaml"
    source.write_text("".join(json.dumps({"question": p.question, "answer": str(p.answer)}) + "\n" for p in generate(3, seed=4)))
    spec.write_text(json.dumps({"source": {"kind": "local", "path": str(source)}, "sampler": {"budget": 8}}))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(scheduled_build, "write_text", killed)
        with pytest.raises(KeyboardInterrupt):
            scheduled_build.scheduled_run(str(spec), out, REPO)
    commits = [c.oid for c in hub.history()]
    assert not scheduled_build.published_marker(out).exists() and len(commits) == 2
    rerun = scheduled_build.scheduled_run(str(spec), out, REPO)
    assert [c.oid for c in hub.history()] == commits  # no second commit, and the tag stays where it was
    assert rerun["fingerprint"] in json.loads(scheduled_build.published_marker(out).read_text()).values()
    assert scheduled_build.scheduled_run(str(spec), out, REPO)["published"] is False  # and the marker now says so


# ---- network faults (#28): retried where safe, then one line ------------------------------------


def test_rate_limits_and_server_errors_are_retried_and_the_build_lands_once(hub, build_a, monkeypatch):
    from factory.publish import hub as hub_module

    monkeypatch.setattr(hub_module, "BACKOFF_S", (0.0, 0.0, 0.0))
    for route, status in (("api:revision", 429), ("api:commit", 503), ("api:tag", 502)):

        def fail(status=status):
            raise HubError(status, "try again later")

        hub.hooks[route] = fail
    result = publish(build_a, REPO)
    assert [c.title for c in hub.history()][1:] == ["Publish build aaaaaaaaaaaa: 9 traces accepted of 12 problems"]
    assert hub.repos[f"datasets/{REPO}"].tags["build-aaaaaaaaaaaa"] == result["commit"] and not hub.hooks


def test_a_server_that_keeps_failing_is_one_line_naming_the_step(hub, build_a, monkeypatch, capsys):
    from factory.publish import hub as hub_module

    monkeypatch.setattr(hub_module, "BACKOFF_S", (0.0, 0.0, 0.0))
    original = hub.route

    def always_503(method, segments):
        route = original(method, segments)
        if route[0] == "api:create":
            raise HubError(503, "Service Unavailable")
        return route

    monkeypatch.setattr(hub, "route", always_503)
    with pytest.raises(SystemExit) as exit_:
        cli_publish([str(build_a), "--repo-id", REPO])
    message = str(exit_.value.code)
    assert message.startswith(f"factory publish: creating {REPO} failed: ") and "503" in message and "\n" not in message
    assert sum(r.path == "/api/repos/create" for r in hub.requests) == 4  # the first try and three retries


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:{port}", "http://no-such-host.invalid"])
def test_no_route_to_the_hub_is_one_line_naming_the_endpoint(hub, build_a, monkeypatch, endpoint):
    import socket as socket_module

    from factory.publish import hub as hub_module

    with socket_module.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = endpoint.format(port=port)
    monkeypatch.setattr(hub_module, "BACKOFF_S", (0.0, 0.0, 0.0))
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    for args in ([], ["--dry-run"]):
        with pytest.raises(SystemExit) as exit_:
            cli_publish([str(build_a), "--repo-id", REPO, *args])
        message = str(exit_.value.code)
        assert message.startswith(f"factory publish: cannot reach the Hub at {url} while ") and "(4 tries)" in message
        assert "\n" not in message and "Traceback" not in message
