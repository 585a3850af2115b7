"""deploy/raycronjob.yaml: a KubeRay RayCronJob whose scheduled RayJob builds and publishes, with the token
from a Secret, the output on a persistent volume, and the same cluster as deploy/rayjob.yaml."""

from __future__ import annotations

import re
import shlex
import zoneinfo
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
# minute, hour, day of month, month, day of week (0 and 7 are Sunday)
CRON_FIELDS = [
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}),
    (0, 7, {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}),
]
CRON_ITEM = re.compile(r"(\*|\w+(?:-\w+)?)(?:/(\d+))?")


def cron_field_ok(text: str, low: int, high: int, names: dict[str, int]) -> bool:
    """A comma list of `*`, N or N-M (numbers or names within bounds, ascending), each with an optional /STEP > 0."""
    for item in text.split(","):
        match = CRON_ITEM.fullmatch(item)
        if not match:
            return False
        span, step = match.groups()
        if step is not None and int(step) == 0:
            return False
        if span == "*":
            continue
        ends = [names.get(end.upper(), int(end) if end.isdigit() else None) for end in span.split("-")]
        if any(end is None or not low <= end <= high for end in ends) or ends != sorted(ends):
            return False
    return True


def valid_cron(schedule: str) -> bool:
    """Five fields, as Kubernetes CronJob and KubeRay RayCronJob read them; no @macros, no CRON_TZ= prefix (timeZone is a field)."""
    fields = schedule.split()
    return len(fields) == 5 and all(cron_field_ok(text, *bounds) for text, bounds in zip(fields, CRON_FIELDS))


@pytest.mark.parametrize("schedule", ["0 3 * * *", "*/15 * * * *", "0 0 1,15 * MON-FRI", "30 2 * JAN-MAR 0"])
def test_cron_check_accepts(schedule):
    assert valid_cron(schedule)


@pytest.mark.parametrize(
    "schedule", ["0 3 * *", "60 3 * * *", "0 24 * * *", "0 3 * * * *", "@daily", "CRON_TZ=UTC 0 3 * * *", "*/0 * * * *"]
)
def test_cron_check_rejects(schedule):
    assert not valid_cron(schedule)


@pytest.fixture(scope="module")
def cron():
    (doc,) = list(yaml.safe_load_all((DEPLOY / "raycronjob.yaml").read_text()))
    return doc


@pytest.fixture(scope="module")
def head(cron):
    (container,) = cron["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return container


def test_it_is_a_ray_cron_job_with_a_schedule(cron):
    assert cron["apiVersion"] == "ray.io/v1" and cron["kind"] == "RayCronJob" and cron["metadata"]["name"]
    spec = cron["spec"]
    assert valid_cron(spec["schedule"])
    assert spec["suspend"] is False
    if zoneinfo.available_timezones():  # the system's time zone database, when this machine has one
        zoneinfo.ZoneInfo(spec["timeZone"])
    assert isinstance(spec["timeZone"], str) and "/" in spec["timeZone"]


def test_the_job_builds_and_publishes_then_frees_the_cluster(cron):
    job = cron["spec"]["jobTemplate"]
    argv = shlex.split(job["entrypoint"])
    assert any(arg.endswith("jobs/scheduled_build.py") for arg in argv) or argv[0] == "factory"
    options = dict(zip(argv[2::2], argv[3::2])) if argv[0] == "python" else {}
    assert {"--spec", "--output", "--repo-id"} <= set(options)
    assert Path(options["--output"]).is_absolute() and "/" in options["--repo-id"]
    assert job["shutdownAfterJobFinishes"] is True
    assert "rayClusterSpec" in job and job["rayClusterSpec"]["headGroupSpec"] and job["rayClusterSpec"]["workerGroupSpecs"]


def test_the_token_comes_from_a_secret(cron, head):
    (token,) = [env for env in head["env"] if env["name"] == "HF_TOKEN"]
    assert "value" not in token
    ref = token["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"]
    assert not re.search(r"hf_[A-Za-z0-9]{8,}", (DEPLOY / "raycronjob.yaml").read_text())  # no token written into the manifest


def test_the_spec_and_the_output_are_on_mounted_volumes(cron, head):
    job = cron["spec"]["jobTemplate"]
    argv = shlex.split(job["entrypoint"])
    options = dict(zip(argv[2::2], argv[3::2]))
    volumes = {v["name"]: v for v in job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]}

    def volume_of(path: str) -> dict:
        (mount,) = [m for m in head["volumeMounts"] if Path(path).is_relative_to(m["mountPath"])]
        return volumes[mount["name"]]

    assert volume_of(options["--output"])["persistentVolumeClaim"]["claimName"]
    assert "configMap" in volume_of(options["--spec"]) or "persistentVolumeClaim" in volume_of(options["--spec"])


def test_the_cluster_matches_deploy_rayjob(cron):
    rayjob = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    cluster = cron["spec"]["jobTemplate"]["rayClusterSpec"]
    assert cluster["rayVersion"] == rayjob["rayVersion"]

    def images(spec: dict) -> set[str]:
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        return {c["image"] for group in groups for c in group["template"]["spec"]["containers"]}

    assert images(cluster) == images(rayjob)
    assert [g["groupName"] for g in cluster["workerGroupSpecs"]] == [g["groupName"] for g in rayjob["workerGroupSpecs"]]

    def claims(spec: dict) -> set[str]:
        volumes = spec["headGroupSpec"]["template"]["spec"]["volumes"]
        return {v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v}

    assert claims(cluster) == claims(rayjob)


def test_the_dockerfile_builds_the_image_the_manifests_run():
    """The image is Ray's at the manifests' rayVersion, with the package installed as the README does,
    in the manifests' working directory, tagged with the package version; both manifests name that tag."""
    import re
    import tomllib

    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    version = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["version"]
    base = re.search(r"^FROM rayproject/ray:(\S+)-py(\d)(\d+)-gpu$", dockerfile, re.M)
    name = re.search(r'^LABEL org\.opencontainers\.image\.ref\.name="(\S+)"$', dockerfile, re.M)[1]
    assert name.endswith(f":{version}") and f"docker build -t {name} ." in dockerfile
    assert re.search(r"^RUN pip install --no-cache-dir -e \.", dockerfile, re.M) and re.search(r"^WORKDIR /app$", dockerfile, re.M)
    requires = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11" and (int(base[2]), int(base[3])) >= (3, 11)
    for manifest in ("rayjob.yaml", "raycronjob.yaml"):
        doc = yaml.safe_load((DEPLOY / manifest).read_text())
        cluster = doc["spec"]["rayClusterSpec"] if "rayClusterSpec" in doc["spec"] else doc["spec"]["jobTemplate"]["rayClusterSpec"]
        assert cluster["rayVersion"] == base[1]
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        containers = [c for group in groups for c in group["template"]["spec"]["containers"]]
        assert {c["image"] for c in containers} == {name} and {c.get("workingDir") for c in containers} == {"/app"}
