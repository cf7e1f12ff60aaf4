"""The cluster manifests in deploy/: valid Kubernetes objects, and consistent with the Triton that `tes up` starts.

Everything is checked offline, with real validators: Kubernetes' own JSON schemas (kubernetes-validate, strict:
unknown fields fail), Prefect's own work-pool validation and its kubernetes worker (prefect-kubernetes), and the
rules Triton applies to S3 URLs. The kustomize overlay is rendered here in Python (resources + JSON 6902 patches,
the only kustomize features deploy/ uses; any other field fails the test). Nothing talks to a cluster.

    .venv/bin/python -m pytest -q tests/unit/test_deploy_manifests.py
"""

from __future__ import annotations

import asyncio
import copy
import importlib.metadata
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit
from uuid import uuid4

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import WorkPoolCreate
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from serving.triton import ADMIN_HEADER, RESTRICTED_APIS, _restriction_args, _server_args

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE, GPU = KUBERNETES / "base", KUBERNETES / "overlays" / "gpu"
SECRETS_EXAMPLE = KUBERNETES / "secrets.example.yaml"
WORK_POOL = ROOT / "deploy" / "prefect" / "k8s-work-pool.json"

# the oldest and the newest Kubernetes whose schemas we check against (README: deploy/README.md)
KUBERNETES_VERSIONS = ("1.29", "1.37")
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "patches"}  # what render() implements
TRITON_CONTAINER = "tritonserver"
NGC_RELEASE_OF_TRITON = {"2.51": "24.10"}  # NGC's release notes: container release -> Triton version
FLOW_IMAGE = "registry.example.com/train-export-serve:0.1.0"

# Triton core, src/filesystem/implementations/s3.h: a URL naming an endpoint must match this in full; any other is
# read as s3://bucket/path on AWS (so a custom host without a port becomes the bucket).
_TRITON_S3_ENDPOINT_URL = re.compile(
    r"s3://(http://|https://|)([0-9a-zA-Z\-.]+):([0-9]+)/([0-9a-z.\-]+)(((/[0-9a-zA-Z.\-_]+)*)?)"
)
_BUCKET, _SEGMENT = re.compile(r"[0-9a-z.\-]+"), re.compile(r"[0-9a-zA-Z._\-]+")


# -- loading and rendering ------------------------------------------------------------------------------------------


def load_documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document is not None]


def _targets(document: dict, target: dict) -> bool:
    group, _, version = document["apiVersion"].rpartition("/")
    found = {"group": group, "version": version, "kind": document["kind"], "name": document["metadata"]["name"]}
    return all(found[field] == wanted for field, wanted in target.items())


def render(folder: Path, used: set[Path] | None = None) -> list[dict]:
    """The documents `kubectl apply -k folder` would send, for the kustomize subset in KUSTOMIZE_FIELDS."""
    used = set() if used is None else used
    used.add(folder / "kustomization.yaml")
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZE_FIELDS
    assert not unknown, f"{folder}: kustomize fields {sorted(unknown)} are not rendered by this test; extend render()"
    documents: list[dict] = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            documents += render(path, used)
        else:
            used.add(path)
            documents += load_documents(path)
    for patch in kustomization.get("patches", []):
        used.add(folder / patch["path"])
        operations = yaml.safe_load((folder / patch["path"]).read_text())
        assert isinstance(operations, list), f"{patch['path']}: only JSON 6902 patches (a list of operations) render"
        matches = [index for index, document in enumerate(documents) if _targets(document, patch["target"])]
        assert len(matches) == 1, f"{patch['path']}: target {patch['target']} matches {len(matches)} documents"
        documents[matches[0]] = jsonpatch.apply_patch(documents[matches[0]], operations)
    return documents


def one(documents: list[dict], kind: str) -> dict:
    found = [document for document in documents if document["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(deployment: dict, name: str = TRITON_CONTAINER) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def flags(args: list[str]) -> dict[str, str | None]:
    return {arg.partition("=")[0]: (arg.partition("=")[2] if "=" in arg else None) for arg in args}


class _NoPrefectApi:
    """Stands in for a Prefect client: rendering this template must not need the API (no block or variable refs)."""

    def __getattr__(self, name):
        raise AssertionError(f"rendering the work-pool template called the Prefect API ({name})")


def flow_run_job(template: dict, job_variables: dict) -> dict:
    """The Job the kubernetes worker submits for one flow run of a deployment with these job variables."""
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, job_variables, client=_NoPrefectApi())
    )
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid4(), name="brave-otter"))
    return configuration.job_manifest


@pytest.fixture(scope="module")
def base() -> list[dict]:
    return render(BASE)


@pytest.fixture(scope="module")
def gpu() -> list[dict]:
    return render(GPU)


@pytest.fixture(scope="module")
def variants(base, gpu) -> dict[str, list[dict]]:
    return {"base": base, "gpu": gpu}


@pytest.fixture(scope="module")
def secrets() -> list[dict]:
    return load_documents(SECRETS_EXAMPLE)


@pytest.fixture(scope="module")
def work_pool() -> dict:
    return json.loads(WORK_POOL.read_text())


@pytest.fixture(scope="module")
def flow_job(work_pool) -> dict:
    return flow_run_job(work_pool, {"image": FLOW_IMAGE})


# -- schemas --------------------------------------------------------------------------------------------------------


def schema_errors(documents: list[dict], version: str) -> list[str]:
    errors = []
    for document in documents:
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            errors.append(f"{document['kind']}/{document['metadata'].get('name')}: {where}: {error.message}")
    return errors


def without_worker_pod_fields(job: dict) -> dict:
    """The kubernetes worker insists on `parallelism` and `completions` inside the pod spec (its
    `_get_base_job_manifest`); they are not PodSpec fields, and the API server drops them. Strictly checked
    otherwise."""
    job = copy.deepcopy(job)
    pod_spec = job["spec"]["template"]["spec"]
    assert (pod_spec.pop("parallelism"), pod_spec.pop("completions")) == (1, 1)
    return job


def test_every_file_under_deploy_kubernetes_is_checked_here():
    used: set[Path] = set()
    render(BASE, used)
    render(GPU, used)
    on_disk = {path.resolve() for path in KUBERNETES.rglob("*.yaml")}
    assert on_disk - {path.resolve() for path in used} == {SECRETS_EXAMPLE.resolve()}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_are_valid_kubernetes_objects(version, variants, secrets, flow_job):
    documents = [*variants["base"], *variants["gpu"], *secrets, without_worker_pod_fields(flow_job)]
    assert schema_errors(documents, version) == []


def test_the_schema_check_rejects_unknown_fields_and_wrong_types(base):
    deployment = one(base, "Deployment")
    misspelt, wrong_type = copy.deepcopy(deployment), copy.deepcopy(deployment)
    container(misspelt)["readynessProbe"] = container(misspelt).pop("readinessProbe")
    wrong_type["spec"]["replicas"] = "two"
    for broken in (misspelt, wrong_type):
        assert len(schema_errors([broken], KUBERNETES_VERSIONS[-1])) == 1


# -- the Triton Deployment and Service ------------------------------------------------------------------------------


def test_the_deployment_selects_its_own_pods_and_runs_two_replicas_by_default(variants):
    for deployment in (one(documents, "Deployment") for documents in variants.values()):
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"] == {"matchLabels": pod_labels}
        assert deployment["spec"]["replicas"] == 2


def _container_port(triton: dict, port: int | str) -> dict:
    """The container port a probe or Service names, by name or by number."""
    ports = [p for p in triton["ports"] if port in (p["name"], p["containerPort"])]
    assert len(ports) == 1, f"port {port!r} is not exposed by the container (it has {triton['ports']})"
    return ports[0]


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_probes_ask_triton_health_on_its_http_port(variant, variants):
    triton = container(one(variants[variant], "Deployment"))
    http_port = int(flags(triton["args"])["--http-port"])
    expected = {
        "startupProbe": "/v2/health/live",
        "livenessProbe": "/v2/health/live",
        "readinessProbe": "/v2/health/ready",
    }
    for probe, path in expected.items():
        check = triton[probe]["httpGet"]
        assert check["path"] == path, probe
        assert _container_port(triton, check["port"])["containerPort"] == http_port, probe
    # the restricted APIs answer only with the admin key; the probes send none
    assert "health" not in RESTRICTED_APIS


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_the_service_selects_the_pods_and_targets_the_ports_triton_listens_on(variant, variants):
    service, deployment = one(variants[variant], "Service"), one(variants[variant], "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    triton = container(deployment)
    listening = flags(triton["args"])
    by_name = {port["name"]: port for port in service["spec"]["ports"]}
    assert set(by_name) == {"http", "grpc", "metrics"}
    for kind, port in by_name.items():
        target = _container_port(triton, port["targetPort"])
        assert target["containerPort"] == int(listening[f"--{kind}-port"]), kind


def test_triton_starts_with_the_flags_of_tes_up(base):
    """serving/triton.py is the reference: a flag added there fails this test until deploy/ has it too."""
    ports = {"http": 8000, "grpc": 8001, "metrics": 8002}
    local = flags(_server_args("127.0.0.1", ports, Path("/backends")))
    pod = flags(container(one(base, "Deployment"))["args"])
    # one server per pod: it listens on the pod's addresses, uses the image's backends and a private /dev/shm
    not_in_a_pod = {"--http-address", "--grpc-address", "--metrics-address", "--backend-directory", "--backend-config"}
    may_differ = {"--exit-timeout-secs"}  # the pod drains in-flight requests within its termination grace period
    for flag, value in local.items():
        if flag in not_in_a_pod:
            continue
        assert flag in pod, f"{flag} is missing from the Deployment's args"
        if flag not in may_differ:
            assert pod[flag] == value, f"{flag}: the Deployment has {pod[flag]!r}, `tes up` has {value!r}"
    assert pod["--load-model"] == "*" and pod["--model-repository"] == "$(MODEL_REPOSITORY)"


def test_the_admin_apis_are_locked_with_the_key_from_the_secret(base):
    args = container(one(base, "Deployment"))["args"]
    placeholder = "TESADMINKEY"  # _restriction_args refuses the $(...) form, so swap it in afterwards
    locked = [arg.replace(placeholder, "$(TRITON_ADMIN_KEY)") for arg in _restriction_args(placeholder)]
    assert all(arg in args for arg in locked), f"expected {locked} among {args}"
    assert ADMIN_HEADER in locked[0]


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_every_variable_in_the_triton_command_is_defined_in_its_env(variant, variants):
    """Kubernetes leaves an undefined $(VAR) in place, so Triton would get the literal text."""
    triton = container(one(variants[variant], "Deployment"))
    referenced = set(re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", " ".join(triton["command"] + triton["args"])))
    assert referenced and referenced <= {entry["name"] for entry in triton["env"]}


def _unresolved_references(env: list[dict], config_map: dict, secrets: list[dict]) -> list[str]:
    available = {("configMapKeyRef", config_map["metadata"]["name"]): set(config_map["data"])}
    available |= {("secretKeyRef", secret["metadata"]["name"]): set(secret["stringData"]) for secret in secrets}
    missing = []
    for entry in env:
        for kind, ref in entry.get("valueFrom", {}).items():
            if not ref.get("optional") and ref["key"] not in available.get((kind, ref["name"]), set()):
                missing.append(f"{entry['name']}: {kind} {ref['name']}/{ref['key']}")
    return missing


def test_env_references_name_keys_of_the_shipped_config_map_and_documented_secrets(base, secrets, flow_job):
    config_map = one(base, "ConfigMap")
    triton_env = container(one(base, "Deployment"))["env"]
    flow_env = container(flow_job, "prefect-job")["env"]
    assert _unresolved_references(triton_env + flow_env, config_map, secrets) == []
    broken = [*triton_env, {"name": "X", "valueFrom": {"secretKeyRef": {"name": "tes-s3-credentials", "key": "NOPE"}}}]
    assert _unresolved_references(broken, config_map, secrets) == ["X: secretKeyRef tes-s3-credentials/NOPE"]


def test_the_gpu_overlay_gives_each_replica_one_gpu_and_changes_nothing_else(base, gpu):
    base_deployment, gpu_deployment = one(base, "Deployment"), one(gpu, "Deployment")
    assert "nvidia.com/gpu" not in json.dumps(container(base_deployment)["resources"])
    resources = container(gpu_deployment)["resources"]
    assert int(resources["requests"]["nvidia.com/gpu"]) == int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert flags(container(gpu_deployment)["args"])["--allow-gpu-metrics"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        gpu_deployment["spec"]["template"]["spec"]["tolerations"]
    )
    changed = {operation["path"] for operation in jsonpatch.make_patch(base_deployment, gpu_deployment)}
    pod = "/spec/template/spec"
    assert changed <= {f"{pod}/containers/0/args/11", f"{pod}/tolerations"} | {
        path for path in changed if path.startswith(f"{pod}/containers/0/resources")
    }
    assert [document for document in gpu if document["kind"] != "Deployment"] == [
        document for document in base if document["kind"] != "Deployment"
    ]


_QUANTITY_SUFFIXES = {"m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int) -> float:
    number, suffix = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * _QUANTITY_SUFFIXES[suffix]


@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_requests_fit_within_limits(variant, variants):
    """The API server refuses a pod whose request exceeds its limit; the schema cannot tell."""
    resources = container(one(variants[variant], "Deployment"))["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys()
    for name, request in resources["requests"].items():
        assert quantity(request) <= quantity(resources["limits"][name]), name


def test_triton_exits_within_the_termination_grace_period(base):
    deployment = one(base, "Deployment")
    exit_timeout_s = int(flags(container(deployment)["args"])["--exit-timeout-secs"])
    assert exit_timeout_s < deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]


def test_the_image_is_the_ngc_release_of_the_triton_we_test_against(base):
    minor = ".".join(importlib.metadata.version("tritonclient").split(".")[:2])
    assert minor in NGC_RELEASE_OF_TRITON, f"tritonclient {minor}: add its NGC release to NGC_RELEASE_OF_TRITON"
    image = container(one(base, "Deployment"))["image"]
    assert image == f"nvcr.io/nvidia/tritonserver:{NGC_RELEASE_OF_TRITON[minor]}-py3"


# -- the S3 URL -----------------------------------------------------------------------------------------------------


def triton_s3_problems(url: str, endpoint_url: str | None) -> list[str]:
    """What Triton would misread in `url`, given the endpoint boto3 uses (None: AWS S3)."""
    if not url.startswith("s3://"):
        return [f"{url!r} is not an s3:// URL"]
    problems = []
    named = _TRITON_S3_ENDPOINT_URL.fullmatch(url)
    if endpoint_url:
        endpoint = urlsplit(endpoint_url)
        port = endpoint.port or {"http": 80, "https": 443}[endpoint.scheme]
        if not named:
            return [f"{url!r}: a custom endpoint needs s3://host:port/bucket/...; without one Triton reads AWS S3"]
        if ((named[1] or "http://")[:-3], named[2], int(named[3])) != (endpoint.scheme, endpoint.hostname, port):
            problems.append(f"{url!r} names another endpoint than {endpoint_url!r}")
    elif named:
        problems.append(f"{url!r} names an endpoint, but boto3 has none (it would write to AWS S3)")
    bucket, _, path = (f"{named[4]}{named[5]}" if named else url.removeprefix("s3://")).partition("/")
    if not _BUCKET.fullmatch(bucket):
        problems.append(f"bucket {bucket!r}: Triton accepts only [0-9a-z.-]")
    problems += [
        f"path segment {segment!r}: Triton accepts only [0-9a-zA-Z._-]"
        for segment in path.split("/")
        if path and not _SEGMENT.fullmatch(segment)
    ]
    return problems


def test_the_model_repository_url_is_one_triton_reads_from_the_flows_endpoint(base):
    data = one(base, "ConfigMap")["data"]
    assert triton_s3_problems(data["MODEL_REPOSITORY"], data.get("AWS_ENDPOINT_URL_S3")) == []


@pytest.mark.parametrize(
    "url, endpoint_url",
    [
        ("s3://tes-models/triton/v1", None),
        ("s3://minio.storage:9000/tes-models", "http://minio.storage:9000"),
        ("s3://https://s3.example.com:443/tes-models/a/b", "https://s3.example.com"),
    ],
)
def test_the_s3_check_accepts_what_triton_reads(url, endpoint_url):
    assert triton_s3_problems(url, endpoint_url) == []


@pytest.mark.parametrize(
    "url, endpoint_url",
    [
        ("/models", None),
        ("s3://Tes-Models/triton", None),  # uppercase bucket
        ("s3://tes_models/triton", None),  # underscore in the bucket
        ("s3://tes-models/tri ton", None),  # space in a segment
        ("s3://minio.storage/tes-models/triton", "http://minio.storage:9000"),  # no port: the host becomes the bucket
        ("s3://minio.storage:9000/tes-models", "https://minio.storage:9000"),  # Triton would speak plain HTTP
        ("s3://other:9000/tes-models", "http://minio.storage:9000"),  # another endpoint than the flow writes to
        ("s3://minio.storage:9000/tes-models", None),  # Triton reads MinIO, the flow writes to AWS
        ("s3://minio.storage:9000/Tes-Models", "http://minio.storage:9000"),
    ],
)
def test_the_s3_check_refuses_what_triton_misreads(url, endpoint_url):
    assert triton_s3_problems(url, endpoint_url)


# -- the Prefect work pool ------------------------------------------------------------------------------------------


def test_the_work_pool_template_is_accepted_by_the_prefect_api(work_pool):
    jsonschema.validators.validator_for(work_pool["variables"]).check_schema(work_pool["variables"])
    pool = WorkPoolCreate(name="train-export-serve", type="kubernetes", base_job_template=work_pool)
    assert pool.base_job_template == work_pool


def test_the_work_pool_template_keeps_every_setting_of_the_kubernetes_workers_default(work_pool):
    default = KubernetesWorker.get_default_base_job_template()
    assert set(work_pool["job_configuration"]) == set(default["job_configuration"])
    assert set(work_pool["job_configuration"]) == set(KubernetesWorkerJobConfiguration.model_fields)
    assert set(default["variables"]["properties"]) <= set(work_pool["variables"]["properties"])
    assert "image" in work_pool["variables"]["required"]  # Prefect's own image does not hold this project


def test_a_flow_run_gets_the_api_url_the_s3_settings_and_the_flow_image(flow_job, work_pool):
    flow = container(flow_job, "prefect-job")
    names = [entry["name"] for entry in flow["env"]]
    assert len(names) == len(set(names)), f"duplicated env entries (Kubernetes keeps the last): {names}"
    env = {entry["name"]: entry for entry in flow["env"]}
    api_url = work_pool["variables"]["properties"]["prefect_api_url"]["default"]
    assert env["PREFECT_API_URL"]["value"] == api_url
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "tes-s3-credentials", "key": name}
    for name in ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3"):
        assert env[name]["valueFrom"]["configMapKeyRef"]["name"] == "tes-s3"
    assert flow["image"] == FLOW_IMAGE
    assert flow["args"] == shlex.split("prefect flow-run execute")


def test_a_deployment_can_point_flow_runs_at_another_api(work_pool):
    job = flow_run_job(work_pool, {"image": FLOW_IMAGE, "prefect_api_url": "https://api.prefect.cloud/api/x"})
    env = {entry["name"]: entry.get("value") for entry in container(job, "prefect-job")["env"]}
    assert env["PREFECT_API_URL"] == "https://api.prefect.cloud/api/x"
