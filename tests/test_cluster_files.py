"""The cluster files: the launcher YAMLs against the schema Ray ships, the KubeRay manifests against
the ray.io/v1 fields of the KubeRay API reference, the Dockerfile against the package, and every
raysd command they run against raysd's own parser."""

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CLUSTER = REPO / "cluster"
IMAGE = "YOUR-REGISTRY/raysd:0.1.0"  # the tag cluster/Dockerfile's header builds

# ray.io/v1 (KubeRay API reference, https://ray-project.github.io/kuberay/reference/api/): the keys
# each object may have, and those it must have.
KUBERAY = {
    "RayClusterSpec": ({"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                        "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
                        "upgradeStrategy", "workerGroupSpecs"}, {"headGroupSpec"}),
    "HeadGroupSpec": ({"enableIngress", "headService", "rayStartParams", "serviceType", "template"}, {"template"}),
    "WorkerGroupSpec": ({"groupName", "idleTimeoutSeconds", "maxReplicas", "minReplicas", "numOfHosts",
                         "rayStartParams", "replicas", "scaleStrategy", "suspend", "template"},
                        {"groupName", "maxReplicas", "template"}),
    "AutoscalerOptions": ({"env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
                           "securityContext", "upscalingMode", "version", "volumeMounts"}, set()),
    "RayJobSpec": ({"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
                    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
                    "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
                    "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}, {"entrypoint"}),
}


def check_kuberay(obj: dict, kind: str) -> list[str]:
    allowed, required = KUBERAY[kind]
    problems = [f"{kind}: unknown key {k!r}" for k in obj if k not in allowed]
    problems += [f"{kind}: missing {k!r}" for k in required if k not in obj]
    return problems


def check_cluster_spec(spec: dict) -> list[str]:
    problems = check_kuberay(spec, "RayClusterSpec") + check_kuberay(spec["headGroupSpec"], "HeadGroupSpec")
    problems += check_kuberay(spec.get("autoscalerOptions", {}), "AutoscalerOptions")
    for group in spec.get("workerGroupSpecs", []):
        problems += check_kuberay(group, "WorkerGroupSpec")
    return problems


def images(spec: dict) -> set[str]:
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec.get("workerGroupSpecs", [])]
    return {c["image"] for p in pods for c in p["spec"]["containers"]}


def test_launcher_files_validate_against_rays_schema():
    import jsonschema

    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    for name in ("aws.yaml", "gcp.yaml"):
        c = yaml.safe_load((CLUSTER / name).read_text())
        jsonschema.validate(c, schema)  # raises with the path of the first violation
        head = c["available_node_types"][c["head_node_type"]]
        workers = [t for n, t in c["available_node_types"].items() if n != c["head_node_type"]]
        assert head["resources"] == {"CPU": 0}, name  # the head coordinates; GPUs do the work
        assert all(t["resources"].get("GPU") and t["min_workers"] == 0 and t["max_workers"] > 0 for t in workers)
        assert c["docker"]["image"] == IMAGE and "setup_commands" not in c  # the image brings raysd
        assert "--num-cpus=0" in " ".join(c["head_start_ray_commands"])
        for cmd in re.findall(r"raysd run [^\n]*(?:\n#\s+[^\n]*)*", (CLUSTER / name).read_text()):
            assert "resources.device=cuda" in cmd, (name, cmd)


def test_a_wrong_key_fails_the_schema_check():
    import jsonschema

    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    c = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    c["available_node_types"]["gpu_worker"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(c, schema)
    assert check_kuberay({"entrypoint": "x", "shutdownAfterJobFinish": True}, "RayJobSpec") == [
        "RayJobSpec: unknown key 'shutdownAfterJobFinish'"]


def test_kuberay_manifests_use_known_fields_the_image_and_autoscaling():
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay-raycluster.yaml").read_text()))
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and check_cluster_spec(rc["spec"]) == []
    assert rc["spec"]["enableInTreeAutoscaling"] is True and images(rc["spec"]) == {IMAGE}
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    worker = rc["spec"]["workerGroupSpecs"][0]
    assert worker["minReplicas"] == 0 < worker["maxReplicas"]
    assert worker["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert check_kuberay(job["spec"], "RayJobSpec") + check_cluster_spec(job["spec"]["rayClusterSpec"]) == []
    assert job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert images(job["spec"]["rayClusterSpec"]) == {IMAGE}


def test_every_raysd_command_in_the_cluster_files_parses():
    """The RayJob's entrypoint and the commands in the files' headers are valid `raysd` command lines."""
    from raysd.cli import build_parser

    job = yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())
    entry = shlex.split(job["spec"]["entrypoint"])
    assert entry[:2] == ["raysd", "run"]
    args = build_parser().parse_args(entry[1:])
    assert args.dataset == "retinamnist" and "resources.device=cuda" in args.set  # a real dataset, end to end
    for f in ("aws.yaml", "gcp.yaml", "kuberay-raycluster.yaml"):
        text = (CLUSTER / f).read_text().replace("\\\n#", " ")
        for line in re.findall(r"-- (raysd run [^\n]*)", text):
            build_parser().parse_args(shlex.split(line)[1:])


def test_the_dockerfile_builds_the_package_the_files_use():
    """`docker build` cannot run here (no Docker engine): check what it installs and runs instead."""
    text = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-gpu$", text, re.M)  # Python 3.11, Ray 2.60, CUDA
    for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for path in src.split():
            assert (REPO / path).exists(), path
    installs = re.findall(r"pip install (?:--\S+ )*(\S+)", text)
    assert installs == ["/home/ray/raysd"]  # only the package itself: its dependencies come from pyproject.toml
    assert IMAGE in text
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'raysd = "raysd.cli:main"' in pyproject and 'requires-python = ">=3.11"' in pyproject
    assert re.search(r'^CMD \["raysd", ', text, re.M)
