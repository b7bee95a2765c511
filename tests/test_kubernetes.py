"""The Kubernetes manifests (deploy/k8s/) and the Dockerfile, checked offline: no cluster, no Docker.

Every manifest validates against the real schemas of the Kubernetes versions below, strict (an
unknown field fails); the tune workers are an Indexed Job with a GPU each and credentials from
Secrets; every `mlflow run` a container runs is checked against MLproject as the docs' commands
are (tests/test_docs.py's functions); the Dockerfile takes its base image as a build argument.
"""

from __future__ import annotations

import copy
import re
import shlex

import kubernetes_validate
import pytest
import yaml

from tests.conftest import REPO
from tests.test_docs import Command, check_command, shell_lines, shown

K8S = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
# The oldest version the Job needs (backoffLimitPerIndex, podFailurePolicy: GA in 1.33) and the
# newest whose schemas kubernetes-validate bundles.
VERSIONS = ("1.33.0", "1.37.0")
CREDENTIAL = re.compile(r"PASSWORD|SECRET|TOKEN|USERNAME", re.IGNORECASE)
# A password written out: in a URL (scheme://user:password@) or as `password = ...`; `$VAR`s are fine.
LITERAL_PASSWORD = re.compile(r"://[^/@\s:]+:(?!\$)[^/@\s]+@|password\s*=\s*(?!\$)\S", re.IGNORECASE)
ENV_REFERENCE = re.compile(r"\$\((\w+)\)")  # what Kubernetes expands in command and args


def documents(path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def objects(kind: str | None = None) -> list[tuple]:
    return [(path, doc) for path in MANIFESTS for doc in documents(path) if kind in (None, doc["kind"])]


def named(kind: str, name: str) -> dict:
    [doc] = [doc for _, doc in objects(kind) if doc["metadata"]["name"] == name]
    return doc


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def command_lines(container: dict) -> list[tuple[int, str]]:
    """What a container runs, as shell lines: a `sh -c` script's lines, or its words joined."""
    words = container.get("command", []) + container.get("args", [])
    if words[:2] in (["sh", "-c"], ["bash", "-c"]):
        return shell_lines("bash", 1, words[2].splitlines())
    return [(1, shlex.join(words))] if words else []


def command_problems(path, container: dict) -> list[str]:
    """MLproject's entry points and parameters, the project's modules and flags, `$(VAR)`s defined, local env."""
    where = f"{shown(path)} [{container['name']}]"
    problems = []
    for number, line in command_lines(container):
        problems += [f"[{container['name']}] {problem}" for problem in check_command(Command(path, number, line))]
        if "mlflow run" in line and "--env-manager local" not in line:
            problems.append(f"{where}: `mlflow run` without --env-manager local (the image has no conda)")
    defined = {variable["name"] for variable in container.get("env", [])}
    for word in container.get("command", []) + container.get("args", []):
        problems += [f"{where}: $({name}) is not in its env" for name in ENV_REFERENCE.findall(word) if name not in defined]
    return problems


def entry_points_run() -> set[str]:
    found = set()
    for _, doc in objects():
        for container in containers(doc):
            for _, line in command_lines(container):
                if match := re.search(r"mlflow run \S+ .*?-e (\w+)", line):
                    found.add(match.group(1))
    return found


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=shown)
def test_every_manifest_validates_strictly(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_an_unknown_field_and_a_wrong_type():
    job = named("Job", "lstm-tune")
    unknown = copy.deepcopy(job)
    containers(unknown)[0]["gpus"] = 1  # not a field: the GPU is a resource limit
    with pytest.raises(kubernetes_validate.ValidationError, match="gpus"):
        kubernetes_validate.validate(unknown, VERSIONS[0], strict=True)
    wrong = copy.deepcopy(job)
    wrong["spec"]["completions"] = "four"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong, VERSIONS[0], strict=True)


def test_the_tune_workers_are_an_indexed_job_with_a_gpu_each():
    spec = named("Job", "lstm-tune")["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] >= 2
    [worker] = spec["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy requires it
    ignored = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "Ignore"]
    assert {"type": "DisruptionTarget", "status": "True"} in [c for r in ignored for c in r.get("onPodConditions", [])]
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 30  # time to re-queue the trial


def test_credentials_come_from_secrets_and_the_secrets_here_are_examples():
    from_secrets = []
    for path, doc in objects():
        for container in containers(doc):
            for variable in container.get("env", []):
                if CREDENTIAL.search(variable["name"]):
                    assert "secretKeyRef" in variable.get("valueFrom", {}), f"{shown(path)}: {variable['name']} is a literal"
                    from_secrets.append(variable["name"])
            words = " ".join(container.get("command", []) + container.get("args", []))
            assert not LITERAL_PASSWORD.search(words), f"{shown(path)}: a password in {container['name']}'s command"
    assert {"PGPASSWORD", "MLFLOW_TRACKING_PASSWORD"} <= set(from_secrets)
    for path, doc in objects("ConfigMap"):
        assert not LITERAL_PASSWORD.search(" ".join(doc["data"].values())), (
            f"{shown(path)}: a password in {doc['metadata']['name']}"
        )
    for path, secret in objects("Secret"):
        values = {**secret.get("stringData", {}), **secret.get("data", {})}
        assert all("example" in value for key, value in values.items() if not key.endswith("USERNAME")), shown(path)
    assert LITERAL_PASSWORD.search("postgresql://optuna:hunter2@db/optuna") and LITERAL_PASSWORD.search("admin_password = x")
    assert not LITERAL_PASSWORD.search("postgresql://mlflow:$PW@db/mlflow admin_password = $PW postgresql://optuna@db/optuna")


def test_every_key_the_pods_read_is_in_the_settings_or_the_example_secrets():
    provided = {(kind, doc["metadata"]["name"], key) for kind in ("ConfigMap", "Secret") for _, doc in objects(kind)
                for key in {**doc.get("data", {}), **doc.get("stringData", {})}}  # fmt: skip
    for path, doc in objects():
        for container in containers(doc):
            for variable in container.get("env", []):
                for kind, ref in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if ref := variable.get("valueFrom", {}).get(ref):
                        assert (kind, ref["name"], ref["key"]) in provided, f"{shown(path)}: {variable['name']} reads {ref}"


def test_every_mlflow_run_names_an_entry_point_and_only_its_parameters():
    problems = [p for path, doc in objects() for container in containers(doc) for p in command_problems(path, container)]
    assert not problems, "\n".join(problems)
    assert {"prepare", "tune"} <= entry_points_run()  # the harvest itself is not empty


def test_the_command_check_catches_a_wrong_parameter_and_an_undefined_variable():
    container = {
        "name": "worker",
        "args": ["mlflow", "run", ".", "-e", "tune", "--env-manager", "local", "-P", "n_trial=$(N)", "-P", "study=$(STUDY)"],
        "env": [{"name": "STUDY", "value": "smoke"}],
    }
    problems = command_problems(K8S / "x.yaml", container)
    assert len(problems) == 2, problems
    assert "has no parameter 'n_trial'" in problems[0] and "$(N) is not in its env" in problems[1]
    script = {
        "name": "s",
        "args": ["sh", "-c", "cat > a <<X\nmlflow run . -e nope\nX\npython -m pipeline.train --data x --nope 1\n"],
    }
    problems = command_problems(K8S / "x.yaml", script)
    assert len(problems) == 1 and "pipeline.train has no flag --nope" in problems[0], problems


def test_the_dockerfile_takes_its_base_as_a_build_argument_and_forwards_sigterm():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines() if line.strip() and not line.startswith("#")]
    first_from = next(i for i, line in enumerate(lines) if line.startswith("FROM "))
    assert re.fullmatch(r"ARG BASE(=\S+)?", lines[first_from - 1]), lines[first_from - 1]
    assert re.fullmatch(r"FROM \$\{?BASE\}?", lines[first_from])
    # The workers' grace period relies on it: SIGTERM reaches `mlflow run` and tune as Ctrl-C.
    assert 'ENTRYPOINT ["dumb-init", "--rewrite", "15:2", "--"]' in lines
