"""deploy/'s Kubernetes manifests are what docs/deploy.md says they are, and they would work.

- Every ``deploy/**/*.yaml`` parses (several documents per file), each document a resource with
  apiVersion, kind, a name, and the namespace ``normlab`` (but the Namespace itself).
- The core resources (Namespace, Secret, ConfigMap, Service, PVC, StatefulSet, Deployment, ...)
  validate against Kubernetes' own OpenAPI schemas, strictly (an unknown field fails), with the
  schemas kubernetes-validate bundles (offline), at the oldest and the newest version we claim.
- KubeRay's custom resources (no schema bundled) are checked for what normlab needs: apiVersion
  ray.io/v1; each pod template validates as a core PodTemplateSpec; the head has ``num-cpus: "0"``
  (no trial there) and no GPU; a worker group has ``nvidia.com/gpu`` limits and a matching
  ``num-gpus``; ``rayStartParams`` values are strings (KubeRay's type); the shared volume is
  mounted at the same path on every node and its claim is ReadWriteMany; every RayJob picks a
  cluster that exists and asks for no entrypoint resources (its driver needs the head).
- References hold: every Secret key, ConfigMap and PVC a pod names is defined in deploy/; no
  URI in deploy/ carries a password.
- Every ``normlab`` command of a RayJob's entrypoint parses (its options exist), and each
  ``normlab submit SPACE [--profile P] [KEY=VALUE ...]`` validates as ``normlab validate`` with
  the same space, profile and overrides; a search file read from a ConfigMap mounted on the head
  is validated from that ConfigMap. The same for each ``normlab submit`` shown in
  docs/deploy.md; its paths under --storage-path are on the shared volume.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
NAMESPACE = "normlab"
# the oldest Kubernetes we claim (docs/deploy.md) and the newest whose schemas kubernetes-validate carries
K8S_VERSIONS = ("1.31.0", "1.37.0")
RAY_API = "ray.io/v1"
RAY_KINDS = {"RayCluster", "RayJob"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}
SHELL_OPERATORS = {"&&", "||", ";", "|"}


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int  # position in its file
    body: dict[str, Any]

    @property
    def where(self) -> str:
        name = (self.body.get("metadata") or {}).get("name", "?")
        return f"{self.path.relative_to(ROOT)}[{self.index}] {self.body.get('kind')}/{name}"


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def load_docs(files: list[Path]) -> list[Doc]:
    """Every resource of ``files``; a file that does not parse is left out here (test_manifest_parses
    fails on it), so that the other checks still run on the rest."""
    docs = []
    for path in files:
        try:
            bodies = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError:
            continue
        for index, body in enumerate(bodies):
            if isinstance(body, dict):
                docs.append(Doc(path, index, body))
    return docs


FILES = manifest_files()
DOCS = load_docs(FILES)
CORE = [d for d in DOCS if not str(d.body.get("apiVersion", "")).startswith("ray.io/")]
RAY = [d for d in DOCS if str(d.body.get("apiVersion", "")).startswith("ray.io/")]
CLUSTERS = [d for d in RAY if d.body.get("kind") == "RayCluster"]
JOBS = [d for d in RAY if d.body.get("kind") == "RayJob"]


def _ids(docs: list[Doc]) -> list[str]:
    return [d.where for d in docs]


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d.body["metadata"]["name"]: d.body for d in DOCS if d.body.get("kind") == kind}


def test_deploy_has_the_pieces():
    kinds = {d.body.get("kind") for d in DOCS}
    for needed in ("Namespace", "Secret", "ConfigMap", "Service", "PersistentVolumeClaim", "StatefulSet", "Deployment"):
        assert needed in kinds, f"deploy/ defines no {needed}"
    assert CLUSTERS and JOBS, "deploy/ defines no RayCluster or no RayJob"
    assert (DEPLOY / "Dockerfile").is_file(), "deploy/Dockerfile (the normlab image) is missing"


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(ROOT).as_posix() for p in FILES])
def test_manifest_parses(path: Path) -> None:
    try:
        bodies = [b for b in yaml.safe_load_all(path.read_text(encoding="utf-8")) if b is not None]
    except yaml.YAMLError as exc:
        pytest.fail(f"{path.relative_to(ROOT)}: not YAML: {exc}")
    assert bodies, f"{path.relative_to(ROOT)}: no document"
    for index, body in enumerate(bodies):
        where = f"{path.relative_to(ROOT)}[{index}]"
        assert isinstance(body, dict), f"{where}: a resource is a mapping, got {type(body).__name__}"
        assert body.get("apiVersion") and body.get("kind"), f"{where}: no apiVersion or kind"
        metadata = body.get("metadata") or {}
        assert metadata.get("name"), f"{where}: no metadata.name"
        if body["kind"] not in CLUSTER_SCOPED:
            assert metadata.get("namespace") == NAMESPACE, f"{where}: namespace should be {NAMESPACE!r}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("doc", CORE, ids=_ids(CORE))
def test_core_resource_validates(doc: Doc, version: str) -> None:
    problem = None  # failed outside the except: the report shows our line, not jsonschema's traceback
    try:
        kubernetes_validate.validate(doc.body, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        problem = f"{doc.where}: invalid for Kubernetes {version}: {exc.message} at {'.'.join(map(str, exc.path))}"
    except kubernetes_validate.SchemaNotFoundError:
        problem = f"{doc.where}: Kubernetes {version} has no {doc.body['apiVersion']} {doc.body['kind']}"
    if problem:
        pytest.fail(problem)


def _templates(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(group name, rayStartParams, pod template) of the head ("head") and each worker group."""
    spec = cluster["spec"]
    yield "head", spec["headGroupSpec"].get("rayStartParams") or {}, spec["headGroupSpec"]["template"]
    for group in spec.get("workerGroupSpecs") or []:
        yield group["groupName"], group.get("rayStartParams") or {}, group["template"]


def _validate_pod_template(template: dict[str, Any], where: str) -> None:
    """A pod template as Kubernetes would read it: wrapped in a core PodTemplate."""
    wrapper = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    for version in K8S_VERSIONS:
        problem = None
        try:
            kubernetes_validate.validate(wrapper, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, list(exc.path)[1:]))
            problem = f"{where}: not a valid PodTemplateSpec for Kubernetes {version}: {exc.message} at {path}"
        if problem:
            pytest.fail(problem)


def _gpus(container: dict[str, Any]) -> float:
    limits = (container.get("resources") or {}).get("limits") or {}
    return float(limits.get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("doc", RAY, ids=_ids(RAY))
def test_ray_resource(doc: Doc) -> None:
    body = doc.body
    assert body["apiVersion"] == RAY_API, f"{doc.where}: apiVersion {body['apiVersion']!r}, KubeRay's is {RAY_API}"
    assert body["kind"] in RAY_KINDS, f"{doc.where}: kind {body['kind']!r} (expected one of {sorted(RAY_KINDS)})"
    if body["kind"] == "RayJob":
        check_job(doc)
        return
    gpu_groups = []
    for group, params, template in _templates(body):
        where = f"{doc.where} {group}"
        _validate_pod_template(template, where)
        for key, value in params.items():
            assert isinstance(value, str), f"{where}: rayStartParams.{key} must be a string (KubeRay), got {value!r}"
        containers = template["spec"]["containers"]
        gpus = sum(_gpus(c) for c in containers)
        if group == "head":
            assert params.get("num-cpus") == "0", f'{where}: num-cpus must be "0": no trial may land on the head'
            assert gpus == 0, f"{where}: the head is CPU only"
        elif gpus:
            assert params.get("num-gpus") == f"{gpus:g}", (
                f"{where}: num-gpus {params.get('num-gpus')!r} does not match the nvidia.com/gpu limit {gpus:g}"
            )
            gpu_groups.append(group)
    assert gpu_groups, f"{doc.where}: no worker group with nvidia.com/gpu limits"
    check_shared_volume(doc)


def _mounts(template: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the volume mounted there (its pod-level definition), over every container."""
    volumes = {v["name"]: v for v in template["spec"].get("volumes") or []}
    out = {}
    for container in template["spec"]["containers"]:
        for mount in container.get("volumeMounts") or []:
            out[mount["mountPath"]] = volumes[mount["name"]]
    return out


def check_shared_volume(doc: Doc) -> None:
    """A ReadWriteMany claim mounted at the same path on the head and every worker group."""
    claims = _by_kind("PersistentVolumeClaim")
    per_group = []
    for _, _, template in _templates(doc.body):
        per_group.append(
            {
                path: volume["persistentVolumeClaim"]["claimName"]
                for path, volume in _mounts(template).items()
                if "persistentVolumeClaim" in volume
            }
        )
    shared = set.intersection(*(set(g.items()) for g in per_group))
    assert shared, f"{doc.where}: no claim is mounted at the same path on the head and every worker group"
    for path, claim in shared:
        assert claim in claims, f"{doc.where}: the claim {claim!r} at {path} is not defined in deploy/"
        modes = claims[claim]["spec"]["accessModes"]
        assert "ReadWriteMany" in modes, (
            f"{doc.where}: {claim!r} at {path} is {modes}: several nodes need ReadWriteMany"
        )


def shared_paths(cluster: dict[str, Any]) -> set[str]:
    groups = [{p for p, v in _mounts(t).items() if "persistentVolumeClaim" in v} for _, _, t in _templates(cluster)]
    return set.intersection(*groups)


def selected_cluster(job: dict[str, Any]) -> dict[str, Any]:
    selector = job["spec"].get("clusterSelector") or {}
    if "rayClusterSpec" in job["spec"]:
        return {"metadata": job["metadata"], "spec": job["spec"]["rayClusterSpec"]}
    name = selector.get("ray.io/cluster")
    clusters = _by_kind("RayCluster")
    assert name in clusters, (
        f"RayJob {job['metadata']['name']}: clusterSelector names {name!r}, not a RayCluster of deploy/"
    )
    return clusters[name]


def check_job(doc: Doc) -> None:
    spec = doc.body["spec"]
    assert ("clusterSelector" in spec) != ("rayClusterSpec" in spec), (
        f"{doc.where}: give clusterSelector or rayClusterSpec, one of them"
    )
    cluster = selected_cluster(doc.body)
    assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip(), f"{doc.where}: no entrypoint"
    head_cpus = (cluster["spec"]["headGroupSpec"].get("rayStartParams") or {}).get("num-cpus")
    if head_cpus == "0":
        for key in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources"):
            assert not spec.get(key), (
                f"{doc.where}: {key} sends the driver off the head (num-cpus 0) to a worker, which lacks the head's "
                "Secret and search files and loses a trial's CPU"
            )
    assert normlab_commands(spec["entrypoint"]), f"{doc.where}: the entrypoint runs no normlab command"


def test_references_resolve():
    secrets, config_maps, claims = _by_kind("Secret"), _by_kind("ConfigMap"), _by_kind("PersistentVolumeClaim")
    claims_of_sets = {
        t["metadata"]["name"]
        for d in DOCS
        if d.body.get("kind") == "StatefulSet"
        for t in d.body["spec"].get("volumeClaimTemplates") or []
    }
    problems = []
    for doc in DOCS:
        for node in _walk(doc.body):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                data = {
                    **(secrets.get(ref["name"], {}).get("stringData") or {}),
                    **(secrets.get(ref["name"], {}).get("data") or {}),
                }
                if ref["key"] not in data:
                    problems.append(f"{doc.where}: Secret {ref['name']!r} with key {ref['key']!r} is not in deploy/")
            ref = node.get("configMap")
            if isinstance(ref, dict) and ref.get("name") not in config_maps:
                problems.append(f"{doc.where}: ConfigMap {ref.get('name')!r} is not in deploy/")
            ref = node.get("persistentVolumeClaim")
            if isinstance(ref, dict) and ref.get("claimName") not in claims:
                problems.append(f"{doc.where}: PersistentVolumeClaim {ref.get('claimName')!r} is not in deploy/")
        if doc.body.get("kind") == "StatefulSet":
            for container in doc.body["spec"]["template"]["spec"]["containers"]:
                volumes = {v["name"] for v in doc.body["spec"]["template"]["spec"].get("volumes") or []}
                for mount in container.get("volumeMounts") or []:
                    if mount["name"] not in volumes | claims_of_sets:
                        problems.append(f"{doc.where}: volume {mount['name']!r} is mounted but not defined")
    assert not problems, "\n".join(problems)


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


_URI_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/@:'\"]+:[^\s/@'\"]+@")


def test_no_password_in_a_uri():
    for path in [*FILES, DEPLOY_DOC]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            assert not _URI_WITH_PASSWORD.search(line), (
                f"{path.relative_to(ROOT)}:{number}: a URI with a password (use a Secret and PGPASSWORD): {line.strip()}"
            )


# --- the normlab commands -----------------------------------------------------------------


def normlab_commands(command_line: str) -> list[list[str]]:
    """Each ``normlab ...`` command of a shell command line, as its arguments after ``normlab``:
    ``normlab`` where a command starts (the line's start, after ``&&``, ``;``, ``|`` or ``--``,
    as in ``ray job submit ... -- normlab ...``; ``VAR=value`` prefixes skipped), not an
    argument such as a namespace that happens to be called normlab."""
    found: list[list[str]] = []
    current: list[str] | None = None
    starts = True
    for token in shlex.split(command_line, comments=True):
        if token in SHELL_OPERATORS or token == "--":
            current, starts = None, True
        elif current is not None:
            current.append(token)
        elif starts and re.fullmatch(r"[A-Za-z_]\w*=.*", token):
            continue
        elif starts and PurePosixPath(token).name == "normlab":
            current = []
            found.append(current)
        else:
            starts = False
    return found


def _head_files(cluster: dict[str, Any]) -> dict[str, str]:
    """Files the head sees from ConfigMaps: absolute path -> content."""
    config_maps = _by_kind("ConfigMap")
    files = {}
    for path, volume in _mounts(cluster["spec"]["headGroupSpec"]["template"]).items():
        if "configMap" in volume:
            for key, content in (config_maps[volume["configMap"]["name"]].get("data") or {}).items():
                files[str(PurePosixPath(path) / key)] = content
    return files


def check_normlab_command(args: list[str], where: str, cluster: dict[str, Any], tmp_path: Path) -> None:
    """The command parses as normlab's CLI would; a submit validates like `normlab validate`."""
    assert args and args[0] in main.commands, f"{where}: `normlab {' '.join(args[:1])}` is not a normlab command"
    command = main.commands[args[0]]
    try:
        params = command.make_context(args[0], list(args[1:]), parent=click.Context(main, info_name="normlab")).params
    except click.ClickException as exc:
        pytest.fail(f"{where}: `normlab {shlex.join(args)}` does not parse: {exc.format_message()}")
    storage = params.get("storage_path")
    if storage and not storage.startswith("s3://"):
        assert any(PurePosixPath(storage).is_relative_to(p) for p in shared_paths(cluster)), (
            f"{where}: --storage-path {storage} is not on the volume every node mounts ({sorted(shared_paths(cluster))})"
        )
    if args[0] != "submit":
        return
    space = params["space"]
    head_files = _head_files(cluster)
    if space in head_files:  # a search file from a ConfigMap the head mounts
        local = tmp_path / PurePosixPath(space).name
        local.write_text(head_files[space], encoding="utf-8")
        space = str(local)
    else:
        assert not space.startswith("/"), f"{where}: the head sees no file {space} (no ConfigMap of deploy/ mounts it)"
    validate = ["validate", space, *params["overrides"]]
    if params.get("profile"):
        validate += ["--profile", params["profile"]]
    result = CliRunner().invoke(main, validate)
    assert result.exit_code == 0, (
        f"{where}: `normlab {shlex.join(args)}` does not validate (`normlab {shlex.join(validate)}`):\n{result.output}"
    )


@pytest.mark.parametrize("doc", JOBS, ids=_ids(JOBS))
def test_rayjob_entrypoint_validates(doc: Doc, tmp_path: Path) -> None:
    cluster = selected_cluster(doc.body)
    commands = normlab_commands(doc.body["spec"]["entrypoint"])
    assert commands, f"{doc.where}: the entrypoint runs no normlab command"
    for args in commands:
        check_normlab_command(args, doc.where, cluster, tmp_path)


def test_every_search_file_the_head_mounts_validates(tmp_path: Path) -> None:
    (cluster,) = [d.body for d in CLUSTERS]
    files = {path: text for path, text in _head_files(cluster).items() if path.endswith((".yaml", ".yml"))}
    assert files, "the head mounts no search file: search-spaces.yaml is its example"
    for path, text in files.items():
        local = tmp_path / PurePosixPath(path).name
        local.write_text(text, encoding="utf-8")
        result = CliRunner().invoke(main, ["validate", str(local)])
        assert result.exit_code == 0, f"{path} (a ConfigMap of deploy/) does not validate:\n{result.output}"


def doc_commands() -> list[tuple[int, list[str]]]:
    """(line, arguments) of each normlab command in docs/deploy.md's fenced shell blocks."""
    if not DEPLOY_DOC.exists():
        return []
    found, fence, pending, first = [], None, "", 0
    for number, line in enumerate(DEPLOY_DOC.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:]
            continue
        if fence not in ("bash", "sh", "shell", "console"):
            continue
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        found += [(first, args) for args in normlab_commands(pending + line)]
        pending = ""
    return found


DOC_COMMANDS = doc_commands()


def test_deploy_doc_shows_the_commands():
    assert DEPLOY_DOC.exists(), "docs/deploy.md is missing"
    verbs = {args[0] for _, args in DOC_COMMANDS if args}
    assert {"submit", "resume"} <= verbs, f"docs/deploy.md shows normlab {sorted(verbs)}: submit and resume expected"


@pytest.mark.parametrize("line,args", DOC_COMMANDS, ids=[f"deploy.md:{n}" for n, _ in DOC_COMMANDS])
def test_deploy_doc_command_validates(line: int, args: list[str], tmp_path: Path) -> None:
    (cluster,) = [d.body for d in CLUSTERS]
    check_normlab_command(args, f"docs/deploy.md:{line}", cluster, tmp_path)


# --- the image ------------------------------------------------------------------------------


def test_dockerfile_installs_the_lock_as_the_makefile_does():
    """deploy/Dockerfile installs requirements/lock.txt with the Makefile's flags (hashes checked,
    no resolver), then normlab without dependencies, and copies only files that exist."""
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lock_install = "pip install --quiet --require-hashes --no-deps -r $(LOCK)"
    assert lock_install in makefile, "the Makefile no longer installs the lock this way: update deploy/Dockerfile too"
    assert "pip install --require-hashes --no-deps -r requirements/lock.txt" in dockerfile
    assert re.search(r"pip install --no-deps( --no-build-isolation)? \.", dockerfile), "normlab itself, --no-deps"
    assert "trainables.environment check requirements/lock.txt" in dockerfile, "the image proves it is the lock"
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source}, which the checkout lacks"
