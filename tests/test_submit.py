"""`ablate submit`: the SLURM script and the Kubernetes manifest it makes, and what it refuses (in one line).

Submitting to a real SLURM is tested in test_slurm.py; no Kubernetes cluster runs here, so the manifest is checked
against the official client's own models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import TINY, run_cli

from ablate.training.data import synthetic_pairs

SEARCH = """\
kind = "search"
name = "probe"
n_trials = 4
[base]
loss = "infonce"
epochs = 2
batch_size = 16
data = { source = "pairs.npz" }
model = { hidden = [16] }
[params.temperature]
type = "float"
low = 0.05
high = 0.5
"""


@pytest.fixture
def created(workdir: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """A search created on PostgreSQL (nothing trained), its storage given with a password; (study, storage URL)."""
    synthetic_pairs(TINY).save(workdir / "pairs.npz")
    (workdir / "probe.toml").write_text(SEARCH)
    url = postgres_url.replace("postgres@", "postgres:s3cret@")  # trust authentication ignores the password
    monkeypatch.setenv("ABLATE_STORAGE", url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    code, out, err = run_cli(["tune", "probe.toml", "--jobs", "0"], monkeypatch, capsys)
    assert code == 0, err
    return re.search(r"study (probe-\w+) in", out).group(1), url  # type: ignore[union-attr]


def test_the_slurm_script_asks_for_what_the_flags_say_and_holds_no_password(created, monkeypatch, capsys):
    study, _ = created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")  # tasks on any node reach a server
    code, out, err = run_cli(["submit", "probe", "--workers", "3", "--gpus-per-worker", "2", "--cpus-per-worker", "8",
                              "--mem", "16G", "--partition", "gpu", "--time", "4:00:00", "--account", "lab",
                              "--sbatch-arg", "--qos=short", "--signal-before", "300", "--dry-run"],
                             monkeypatch, capsys)
    assert code == 0, err
    directives = re.findall(r"^#SBATCH (\S+)$", out, re.M)
    for d in ("--array=0-2", "--gres=gpu:2", "--cpus-per-task=8", "--mem=16G", "--partition=gpu", "--time=4:00:00",
              "--account=lab", "--qos=short", "--signal=B:TERM@300", "--requeue", f"--job-name=ablate-{study}"):
        assert d in directives, (d, directives)
    assert re.search(rf"^exec \S+ -m ablate worker {study} --jobs auto --array auto --heartbeat 20$", out, re.M)
    assert "s3cret" not in out and "postgres:***@" in out
    assert not Path("slurm").exists()  # --dry-run writes nothing


def test_the_kubernetes_manifest_is_a_valid_indexed_job_with_the_urls_from_a_secret(created, monkeypatch, capsys):
    from kubernetes import client

    study, _ = created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")  # pods reach a tracking server
    code, out, err = run_cli(["submit", "probe", "--scheduler", "kubernetes", "--workers", "4", "--gpus-per-worker",
                              "1", "--mem", "16Gi", "--image", "registry/ablate:1", "--namespace", "ml", "--secret",
                              "stores", "--dry-run"], monkeypatch, capsys)
    assert code == 0, err
    assert "s3cret" not in out
    doc: dict[str, Any] = yaml.safe_load(out)
    api = client.ApiClient()
    job = api._ApiClient__deserialize(doc, "V1Job")  # the client's own models (they refuse a missing required field)
    assert api.sanitize_for_serialization(job) == doc  # and keep every key: a misspelt one would be dropped
    spec = job.spec
    assert (spec.completion_mode, spec.completions, spec.parallelism) == ("Indexed", 4, 4)
    assert job.metadata.namespace == "ml"
    (container,) = spec.template.spec.containers
    assert container.image == "registry/ablate:1"
    assert container.command[:3] == ["ablate", "worker", study]
    assert container.resources.limits == {"cpu": "1", "nvidia.com/gpu": "1", "memory": "16Gi"}
    refs = {e.name: (e.value_from.secret_key_ref.name, e.value_from.secret_key_ref.key) for e in container.env}
    assert refs == {"ABLATE_STORAGE": ("stores", "storage"), "MLFLOW_TRACKING_URI": ("stores", "tracking-uri")}
    assert spec.template.spec.termination_grace_period_seconds == 120


def _one_line(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
              message: str) -> None:
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err + out


def test_what_cannot_work_across_machines_is_one_line(created, workdir, monkeypatch, capsys):
    with monkeypatch.context() as m:  # stores a single-node cluster can reach, with or without SLURM running here
        m.setattr("ablate.study.schedulers.single_node", lambda partition: True)
        _one_line(["submit", "nope", "--dry-run"], monkeypatch, capsys, "no study")
    local = f"sqlite:///{workdir / 'optuna.db'}"
    _one_line(["submit", "probe", "--storage", local, "--partition", "not-a-partition", "--dry-run"], monkeypatch,
              capsys, f"the Optuna storage {local} is a file on this machine")
    _one_line(["submit", "probe", "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--partition",
               "not-a-partition", "--dry-run"], monkeypatch, capsys, "the MLflow store sqlite:///")
    _one_line(["submit", "probe", "--scheduler", "kubernetes", "--dry-run"], monkeypatch, capsys,
              "the MLflow store sqlite:///")
    _one_line(["submit", "probe", "--scheduler", "nomad"], monkeypatch, capsys, "choose slurm or kubernetes")
    monkeypatch.setenv("PATH", str(workdir))  # no sbatch here
    _one_line(["submit", "probe"], monkeypatch, capsys, "sbatch is not on PATH")


def test_kubernetes_without_a_cluster_configuration_is_one_line(created, workdir, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.invalid:5000")
    monkeypatch.setenv("KUBECONFIG", str(workdir / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    _one_line(["submit", "probe", "--scheduler", "kubernetes"], monkeypatch, capsys,
              "no Kubernetes configuration found")
