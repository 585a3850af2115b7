"""`factory publish OUT --repo-id ORG/NAME`: a finished build as ONE commit of a Hub dataset repo, then a tag.

What is published is exactly README.md, manifest.json and the data files manifest.json lists: never
OUT/_build (resume state) nor a user's own files. The factory's data files of an earlier build that this
build no longer holds are deleted in the same commit, so a reader never sees two builds mixed. The commit
names the branch head it was planned against (`parent_commit`): if anyone committed in between, the Hub
refuses it and nothing changes. The token is found by huggingface_hub itself (HF_TOKEN or the `hf auth
login` file); this module never reads, prints or writes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, RepoFile, constants
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils.sha import git_hash

from factory import __version__
from factory.build.output import DATA_FILE

REPO_TYPE = "dataset"
DEFAULT_BRANCH = "main"
CARD, MANIFEST = "README.md", "manifest.json"
# The names the factory gives its data files: only these are ever deleted from the repo, never a user's own files.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
FINGERPRINT = re.compile(r"[0-9a-f]{12}")


class PublishError(Exception):
    """A publish that cannot go ahead. The message is one line, meant for the user."""


# ---- the local build ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FinishedBuild:
    root: Path
    manifest: dict
    files: list[str]  # relative posix paths to publish: the card, the manifest, the data files

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


def read_build(out_dir: str | Path) -> FinishedBuild:
    """A build is finished when manifest.json exists and every file it lists exists: the build writes the
    manifest after its data files, so a directory without one holds no dataset yet."""
    root = Path(out_dir)
    if not root.is_dir():
        raise PublishError(f"{root} is not a directory")
    manifest = read_manifest(root)
    data = listed_files(manifest)
    missing = [path for path in [CARD, *data] if not (root / path).is_file()]
    if missing:
        raise PublishError(
            f"{root} is not a finished build: {len(missing)} file(s) it lists are missing, first {missing[0]}; rerun the build"
        )
    check_card(root / CARD, data)
    if manifest.get("fingerprint") and manifest["fingerprint"] not in (root / CARD).read_text():
        raise PublishError(f"{root}: {CARD} is not the card of this manifest's build {manifest['fingerprint']}; rerun the build")
    return FinishedBuild(root, manifest, [CARD, MANIFEST, *data])


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise PublishError(f"{root} is not a finished build: it has no {MANIFEST} (the build has not assembled its dataset)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PublishError(f"{path} cannot be read: {err}") from None
    if not isinstance(manifest, dict) or not FINGERPRINT.fullmatch(str(manifest.get("fingerprint", ""))):
        raise PublishError(f"{path} has no fingerprint (12 hex digits); it is not a factory build manifest")
    return manifest


def listed_files(manifest: dict) -> list[str]:
    """The data files of manifest["files"] (config -> paths). Each must be a plain relative path under data/,
    so that a manifest can never make publish upload something outside the build directory."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(paths, list) for paths in files.values()):
        raise PublishError(f"{MANIFEST} has no 'files' map from config to a list of paths")
    paths = sorted({path for config in files.values() for path in config})
    for path in paths:
        if not isinstance(path, str) or not is_plain_data_path(path):
            raise PublishError(f"{MANIFEST} lists {path!r}, which is not a relative path under data/")
    return paths


def is_plain_data_path(path: str) -> bool:
    pure = PurePosixPath(path)
    return str(pure) == path and not pure.is_absolute() and ".." not in pure.parts and "\\" not in path and pure.parts[0] == "data"


def check_card(card: Path, data: list[str]) -> None:
    """Every file pattern of the card's `configs:` must match a data file of this build: a card from another
    build than the manifest (a build stopped between writing the two) would publish a dataset that does not load."""
    for config, pattern in card_patterns(card.read_text()):
        if not any(fnmatchcase(path, pattern) for path in data):
            raise PublishError(f"{CARD} config {config!r} names {pattern}, which matches no file {MANIFEST} lists; rerun the build")


def card_patterns(text: str) -> Iterator[tuple[str, str]]:
    """(config, path pattern) pairs of the YAML front matter's `configs:`; none when the card has no front matter."""
    if not text.startswith("---\n") or "\n---" not in text[3:]:
        return
    try:
        front = yaml.safe_load(text[4 : text.index("\n---", 3)]) or {}
    except yaml.YAMLError as err:
        raise PublishError(f"{CARD} front matter is not valid YAML: {' '.join(str(err).split())}") from None
    for config in front.get("configs") or []:
        data_files = config.get("data_files") or []
        for entry in [data_files] if isinstance(data_files, str | dict) else data_files:
            paths = entry.get("path", []) if isinstance(entry, dict) else entry
            for pattern in [paths] if isinstance(paths, str) else paths:
                yield config.get("config_name", "default"), pattern


# ---- the remote repo ---------------------------------------------------------------------------


@dataclass
class Remote:
    exists: bool
    head: str | None  # the branch's head commit; None while the repo or the branch does not exist
    files: dict[str, RepoFile] = field(default_factory=dict)  # of the branch, or of the default branch it will start from
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit
    private: bool | None = None


def read_remote(api: HfApi, repo_id: str, branch: str) -> Remote:
    """The branch head and, at exactly that commit, its files: listing by commit id, not by branch name, keeps
    the plan consistent even if the branch moves while it is read (the commit then fails on parent_commit)."""

    def read() -> Remote:
        try:
            info = api.repo_info(repo_id, repo_type=REPO_TYPE, revision=branch)
            head = base = info.sha
        except RepositoryNotFoundError:
            return Remote(exists=False, head=None)
        except RevisionNotFoundError:  # a new branch starts from the default branch
            info = api.repo_info(repo_id, repo_type=REPO_TYPE)
            head, base = None, info.sha
        tree = api.list_repo_tree(repo_id, recursive=True, revision=base, repo_type=REPO_TYPE)
        files = {entry.path: entry for entry in tree if isinstance(entry, RepoFile)}
        tags = {ref.name: ref.target_commit for ref in api.list_repo_refs(repo_id, repo_type=REPO_TYPE).tags}
        return Remote(exists=True, head=head, files=files, tags=tags, private=info.private)

    return hub_call(api, f"reading {repo_id}", read)


def same_content(local: Path, remote: RepoFile | None) -> bool:
    """LFS files compare by their sha256, regular files by their git blob id; sizes first, so hashing is rare."""
    if remote is None:
        return False
    size = local.stat().st_size
    if remote.lfs is not None:
        return remote.lfs.size == size and sha256_file(local) == remote.lfs.sha256
    return remote.size == size and git_hash(local.read_bytes()) == remote.blob_id


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the plan ----------------------------------------------------------------------------------


@dataclass
class PublishPlan:
    repo_id: str
    branch: str
    additions: list[str]  # paths to upload: new, or changed since the branch head
    deletions: list[str]  # the factory's data files on the branch that this build does not hold
    parent_commit: str | None  # the branch head the commit is made on; None for a new repo or branch
    tag: str
    unchanged: list[str] = field(default_factory=list)  # paths the branch already holds with the same content
    tag_target: str | None = None  # the commit an existing tag of that name points at
    repo_exists: bool = True
    repo_private: bool | None = None

    @property
    def changes(self) -> bool:
        return bool(self.additions or self.deletions)


def plan_publish(out_dir: str | Path, api: HfApi, repo_id: str, revision: str | None, *, tag: str | None = None) -> PublishPlan:
    """What publishing the build at out_dir to repo_id@revision would do. Reads the Hub, changes nothing."""
    build = read_build(out_dir)
    branch = revision or DEFAULT_BRANCH
    remote = read_remote(api, repo_id, branch)
    published = set(build.files)
    unchanged = [path for path in build.files if same_content(build.root / path, remote.files.get(path))]
    tag = tag or f"build-{build.fingerprint}"
    return PublishPlan(
        repo_id=repo_id,
        branch=branch,
        additions=[path for path in build.files if path not in unchanged],
        deletions=sorted(path for path in remote.files if DATA_FILE.fullmatch(path) and path not in published),
        parent_commit=remote.head,
        tag=tag,
        unchanged=unchanged,
        tag_target=remote.tags.get(tag),
        repo_exists=remote.exists,
        repo_private=remote.private,
    )


def decide(plan: PublishPlan) -> str:
    """What publish does: "commit", "tag" (the branch already holds these files, only the tag is missing) or
    "nothing". An existing tag is never moved: it names one published build, and whoever pinned it must keep
    getting that build."""
    if plan.tag_target is None:
        return "commit" if plan.changes else "tag"
    if not plan.changes:
        return "nothing"
    raise PublishError(
        f"tag {plan.tag} already exists on {plan.repo_id} (commit {plan.tag_target[:12]}) and this build differs from "
        f"what {plan.branch} holds; pass --tag NAME to publish it under another tag"
    )


def describe(plan: PublishPlan, build: FinishedBuild, private: bool) -> list[str]:
    """The plan as lines for --dry-run: one per file operation, then the commit it builds on and the tag."""
    if not plan.repo_exists:
        lines = [f"create repo  {plan.repo_id} (dataset, {'private' if private else 'the namespace default visibility'})"]
    else:
        lines = [f"repo         {plan.repo_id} exists{' (private)' if plan.repo_private else ''}"]
    if plan.repo_exists and plan.parent_commit is None:
        lines.append(f"create branch {plan.branch} from {DEFAULT_BRANCH}")
    lines += [f"add          {path} ({(build.root / path).stat().st_size} bytes)" for path in plan.additions]
    lines += [f"delete       {path}" for path in plan.deletions]
    lines += [f"unchanged    {path}" for path in plan.unchanged]
    lines.append(f"parent       {plan.parent_commit or 'none (new ' + ('branch' if plan.repo_exists else 'repo') + ')'} on {plan.branch}")
    lines.append(f"tag          {plan.tag}" + (f" (exists, at {plan.tag_target[:12]})" if plan.tag_target else ""))
    return lines


# ---- publishing --------------------------------------------------------------------------------


# Answers worth another try, and the waits between tries: a rate limit or a server having a bad
# moment. Every call retried is safe to repeat: reads, creates with exist_ok, a tag (an existing one at
# this commit counts as made), and the commit, which names its parent, so a repeat can never commit twice.
TRANSIENT = {429, 500, 502, 503, 504}
BACKOFF_S = (1.0, 4.0, 16.0)


def network_error(err: BaseException) -> bool:
    """No route, a DNS failure, a refused or dropped connection, a timeout: whichever HTTP library the
    Hub client runs on (httpx's TransportError, requests' ConnectionError and Timeout, the OS's own)."""
    names = {c.__name__ for c in type(err).__mro__}
    return isinstance(err, OSError) or bool(names & {"TransportError", "ConnectionError", "Timeout", "TimeoutException"})


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def hub_call(api: HfApi, what: str, call: Callable):
    """`call()`, tried again after BACKOFF_S on a transient answer or a network error; then a Hub error
    is one PublishError naming the step, and a network error one naming the endpoint."""
    for wait in (*BACKOFF_S, None):
        try:
            return call()
        except HfHubHTTPError as err:
            status = err.response.status_code if err.response is not None else None
            if status in TRANSIENT and wait is not None:
                time.sleep(wait)
                continue
            raise PublishError(f"{what} failed: {one_line(err)}") from None
        except Exception as err:
            if not network_error(err):
                raise
            if wait is not None:
                time.sleep(wait)
                continue
            raise PublishError(
                f"cannot reach the Hub at {api.endpoint} while {what} ({len(BACKOFF_S) + 1} tries): {type(err).__name__}: {one_line(err)}"
            ) from None


def commit(api: HfApi, build: FinishedBuild, plan: PublishPlan) -> tuple[str, str]:
    """ONE commit holding every addition and deletion, made only if the branch head is still plan.parent_commit.
    Returns (commit id, commit url)."""
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(build.root / path)) for path in plan.additions]
    operations += [CommitOperationDelete(path_in_repo=path) for path in plan.deletions]
    manifest = build.manifest
    summary = (
        f"Publish build {build.fingerprint}: {manifest.get('accepted', '?')} traces accepted of {manifest.get('problems', '?')} problems"
    )
    description = "\n".join(
        [
            f"spec_hash: {manifest.get('spec_hash')}",
            f"code_version: {manifest.get('code_version')}",
            f"published by mdlm-factory {__version__}",
            f"{len(plan.additions)} file(s) added or updated, {len(plan.deletions)} data file(s) of an earlier build deleted",
        ]
    )
    where = f"committing to {plan.repo_id}@{plan.branch}"

    def create():
        try:
            return api.create_commit(
                plan.repo_id,
                operations=operations,
                commit_message=summary,
                commit_description=description,
                repo_type=REPO_TYPE,
                revision=plan.branch,
                parent_commit=plan.parent_commit,
            )
        except HfHubHTTPError as err:
            if err.response is not None and err.response.status_code == 412:
                read_at = (plan.parent_commit or "its creation")[:12]
                raise PublishError(
                    f"the branch {plan.branch} of {plan.repo_id} moved since this publish read it at {read_at} "
                    "(someone else committed, or a retried commit of this publish landed); rerun publish"
                ) from None
            raise
        except ValueError as err:  # the client's own checks, e.g. invalid card metadata
            raise PublishError(f"{where} failed: {one_line(err)}") from None

    info = hub_call(api, where, create)
    return info.oid, info.commit_url


def commit_url(api: HfApi, repo_id: str, oid: str) -> str:
    return f"{api.endpoint}/datasets/{repo_id}/commit/{oid}"


def publish(
    out_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    tag: str | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Publish the finished build at out_dir to the dataset repo repo_id (branch `revision`, default main) as
    one commit, then tag that commit (default build-<fingerprint>). Without `private` a new repo gets the
    namespace's default visibility; an existing repo's visibility is never changed. Returns what was done."""
    if not REPO_ID.fullmatch(repo_id):
        raise PublishError(f"--repo-id {repo_id!r} is not ORG/NAME")
    build = read_build(out_dir)  # before any request: an unfinished build never reaches the Hub
    if constants.is_offline_mode():
        raise PublishError("HF_HUB_OFFLINE is set; unset it to publish")
    api = api or HfApi(endpoint=os.environ.get("HF_ENDPOINT"))
    if dry_run:
        return dry_run_publish(build, api, repo_id, private, revision, tag, log)
    hub_call(api, f"creating {repo_id}", lambda: api.create_repo(repo_id, repo_type=REPO_TYPE, private=private or None, exist_ok=True))
    if revision and revision != DEFAULT_BRANCH:
        hub_call(
            api,
            f"creating branch {revision} of {repo_id}",
            lambda: api.create_branch(repo_id, branch=revision, repo_type=REPO_TYPE, exist_ok=True),
        )
    plan = plan_publish(build.root, api, repo_id, revision, tag=tag)
    if private and plan.repo_private is False:
        log(f"warning: {repo_id} already exists and is public; --private does not change an existing repo")
    action = decide(plan)
    if action == "nothing":
        log(f"nothing to publish: {repo_id}@{plan.branch} already holds this build and tag {plan.tag} exists ({plan.tag_target})")
        return result(plan, action, plan.tag_target, commit_url(api, repo_id, plan.tag_target))
    if action == "commit":
        oid, url = commit(api, build, plan)
    else:
        log(f"{repo_id}@{plan.branch} already holds these files; tagging its head")
        oid, url = plan.parent_commit, commit_url(api, repo_id, plan.parent_commit)
    step = f"the commit {oid[:12]} succeeded but tagging it {plan.tag}" if action == "commit" else f"tagging {oid[:12]} as {plan.tag}"

    def tag_it() -> None:
        try:
            api.create_tag(repo_id, tag=plan.tag, revision=oid, repo_type=REPO_TYPE, tag_message=f"factory build {build.fingerprint}")
        except HfHubHTTPError as err:  # a retry after a lost answer: the tag is there, at this commit
            tags = api.list_repo_refs(repo_id, repo_type=REPO_TYPE).tags
            if not any(ref.name == plan.tag and ref.target_commit == oid for ref in tags):
                raise err from None

    hub_call(api, step, tag_it)
    log(f"published {repo_id}@{plan.branch}: commit {oid} ({url}), tag {plan.tag}")
    return result(plan, action, oid, url)


def dry_run_publish(build: FinishedBuild, api: HfApi, repo_id: str, private: bool, revision: str | None, tag: str | None, log) -> dict:
    """Print the operations a publish would make. Only reads (GET requests); creates, uploads and commits nothing."""
    plan = plan_publish(build.root, api, repo_id, revision, tag=tag)
    log(f"dry run: publish {build.root} to {repo_id}@{plan.branch}")
    for line in describe(plan, build, private):
        log(f"  {line}")
    action = decide(plan)
    outcome = {"commit": "make one commit and tag it", "tag": "only tag the branch head", "nothing": "do nothing (already published)"}
    log(f"dry run: publish would {outcome[action]}; nothing was changed")
    return result(plan, action, None, None, dry_run=True)


def result(plan: PublishPlan, action: str, oid: str | None, url: str | None, *, dry_run: bool = False) -> dict:
    return asdict(plan) | {"action": action, "commit": oid, "commit_url": url, "dry_run": dry_run}


def cli_publish(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="factory publish",
        description="Publish a finished build directory to a Hugging Face dataset repo as one commit, then tag it. "
        "The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT selects another Hub.",
    )
    ap.add_argument("out", metavar="OUT", help="the finished build directory (holds manifest.json)")
    ap.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="the dataset repo; created if missing")
    ap.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    ap.add_argument("--revision", metavar="BRANCH", help="commit to this branch, created from main if missing (default: main)")
    ap.add_argument("--tag", help="tag for the new commit (default: build-<fingerprint>)")
    ap.add_argument("--dry-run", action="store_true", help="print the operations and change nothing")
    args = ap.parse_args(argv)
    try:
        publish(args.out, args.repo_id, private=args.private, revision=args.revision, tag=args.tag, dry_run=args.dry_run)
    except PublishError as err:
        sys.exit(f"factory publish: {err}")
