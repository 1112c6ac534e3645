"""A loss is one definition: SigLIP against its published formula, a user's loss from a file, a module or
an entry point, trained through arrays beside the built-in losses, and a misbehaving one failing alone."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from support import TINY, run_cli, tiny_run

from ablate import SigLIPLoss, losses
from ablate.errors import AblateError
from ablate.specs import DataSpec, RunSpec, validate
from ablate.study import records
from ablate.training.splits import load_split
from ablate.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

USER_LOSSES = '''
import torch
import torch.nn.functional as F
from torch import nn


class Margin(nn.Module):
    """A hinge on cosine similarity: positives above 1 - margin (per sample, not contrastive)."""

    contrastive = False

    def __init__(self, margin: float = 0.2, weight: float = 1.0):
        super().__init__()
        self.margin, self.weight = margin, weight

    def forward(self, pred, target, ligand_ids=None):
        cos = F.cosine_similarity(pred, target, dim=-1)
        return self.weight * F.relu(1.0 - self.margin - cos).mean()


class HardNegatives(nn.Module):
    """InfoNCE whose negatives are weighted by exp(beta * similarity) (Robinson et al. 2021), learnable scale."""

    functional = True  # forward changes nothing: members may run under vmap

    def __init__(self, hardness: float = 1.0, temperature: float = 0.1):
        super().__init__()
        self.hardness = hardness
        self.log_scale = nn.Parameter(torch.tensor(1.0 / temperature).log())

    def forward(self, pred, target, ligand_ids=None):
        p, t = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        sim = p @ t.T
        logits = sim * self.log_scale.exp()
        eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
        weights = torch.where(eye, torch.ones_like(sim), torch.exp(self.hardness * sim.detach()))
        if ligand_ids is not None:
            shared = (ligand_ids[:, None] == ligand_ids[None, :]) & ~eye
            logits = logits.masked_fill(shared, float("-inf"))
        log_den = torch.logsumexp(logits + weights.log(), dim=1)
        return (log_den - logits.diagonal()).mean()


class Warmup(nn.Module):
    """Weights its cosine part up with the number of training calls: a loss that keeps state (not functional)."""

    def __init__(self, ramp: int = 20):
        super().__init__()
        self.ramp, self.calls = ramp, 0

    def forward(self, pred, target, ligand_ids=None):
        if torch.is_grad_enabled():
            self.calls += 1
        w = min(self.calls, self.ramp) / self.ramp
        return (pred - target).pow(2).mean() + w * (1 - F.cosine_similarity(pred, target, dim=-1)).mean()


class SmallBatches(nn.Module):
    """Refuses batches over 4 x 16 pairs (as a loss whose [B, B] matrix would not fit in memory)."""

    def forward(self, pred, target, ligand_ids=None):
        if pred.shape[0] > 64:
            raise MemoryError(f"[{pred.shape[0]}, {pred.shape[0]}] does not fit")
        s = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / 0.1
        return F.cross_entropy(s, torch.arange(s.shape[0]))


class Raises(nn.Module):
    def forward(self, pred, target, ligand_ids=None):
        raise ValueError("this loss is broken")


class NotScalar(nn.Module):
    def forward(self, pred, target, ligand_ids=None):
        return (pred - target).pow(2).mean(dim=1)


class NaNs(nn.Module):
    def forward(self, pred, target, ligand_ids=None):
        return (pred - target).pow(2).mean() * float("nan")


class Detached(nn.Module):
    def forward(self, pred, target, ligand_ids=None):
        return (pred - target).pow(2).mean().detach()


class NeedsK(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, pred, target, ligand_ids=None):
        return (pred - target).pow(2).mean() * self.k


class WrongForward(nn.Module):
    def forward(self, x):
        return x.sum()


def not_a_class(pred, target):
    return (pred - target).pow(2).mean()
'''


@pytest.fixture
def user_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_losses.py"
    path.write_text(USER_LOSSES)
    return path


# --------------------------------------------------------------------------------------
# SigLIP against the published formula (Zhai et al. 2023), written out with loops in numpy
# --------------------------------------------------------------------------------------


def _siglip_reference(pred: np.ndarray, target: np.ndarray, t: float, b: float, ids: np.ndarray | None) -> float:
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    q = target / np.linalg.norm(target, axis=1, keepdims=True)
    n = len(p)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j or (ids is not None and ids[i] == ids[j]) else -1.0
            logit = t * float(p[i] @ q[j]) + b
            total += math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return -total / n


@pytest.mark.parametrize("masked", [False, True])
def test_siglip_equals_the_papers_sigmoid_loss(masked):
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(12, 7, generator=g, dtype=torch.float64), torch.randn(12, 7, generator=g,
                                                                                       dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5, 5, 6, 7, 8]) if masked else None
    loss = SigLIPLoss(siglip_scale=3.0, siglip_bias=-2.0).double()
    t = loss.log_scale.exp().item()  # 3, as the float32 parameter holds it
    assert t == pytest.approx(3.0, rel=1e-6) and loss.bias.item() == -2.0
    want = _siglip_reference(pred.numpy(), target.numpy(), t, -2.0, None if ids is None else ids.numpy())
    assert loss(pred, target, ids).item() == pytest.approx(want, rel=1e-12)


def test_siglip_starts_at_the_papers_initialisation_and_learns_its_scale_and_bias():
    loss = SigLIPLoss()
    assert loss.scale == pytest.approx(10.0) and loss.bias.item() == -10.0
    assert {n for n, p in loss.named_parameters() if p.requires_grad} == {"log_scale", "bias"}
    spec = tiny_run(loss="siglip", epochs=2, lr=0.05)
    assert spec.loss_args == {"siglip_scale": 10.0, "siglip_bias": -10.0}
    history = list(Trainer.from_spec(spec).epochs())
    assert history[-1].metrics["siglip_scale"] != pytest.approx(10.0)  # learned, and logged per epoch
    assert "siglip_bias" in history[-1].metrics


def test_siglip_is_named_only_in_its_module_and_the_export_list():
    named = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "ablate").rglob("*.py")
                   if "siglip" in p.read_text().lower())
    assert named == ["ablate/__init__.py", "ablate/losses/siglip.py"]


def test_a_built_in_losses_settings_are_run_fields_set_at_the_top_level():
    spec = tiny_run(loss="siglip", siglip_scale=5.0)
    assert spec.loss_args == {"siglip_scale": 5.0, "siglip_bias": -10.0}
    assert spec.applicable()["siglip_scale"] == 5.0 and "temperature" not in spec.applicable()
    with pytest.raises(ValueError, match=r"siglip_scale: .*boolean"):
        tiny_run(loss="siglip", siglip_scale=True)
    assert tiny_run(loss="mse", siglip_scale=5.0).loss_args == {}  # another loss's setting: not this run's


# --------------------------------------------------------------------------------------
# A user's loss
# --------------------------------------------------------------------------------------


def test_a_loss_from_a_file_reads_its_constructor_keywords_as_run_fields(user_file):
    spec = tiny_run(loss=f"{user_file}:Margin", margin=0.3)
    assert spec.loss_args == {"margin": 0.3, "weight": 1.0}
    definition = losses.resolve(spec.loss)
    assert not definition.contrastive and not definition.builtin
    hard = tiny_run(loss=f"{user_file}:HardNegatives")
    assert hard.loss_args == {"hardness": 1.0}  # temperature is the run's own field (its default from specs)
    assert losses.build(hard).log_scale.exp().item() == pytest.approx(1 / 0.07)


@pytest.mark.parametrize(("loss", "message"), [
    ("nowhere.py:Margin", "no file nowhere.py"),
    ("{file}:Margn", "has no 'Margn'; did you mean 'Margin'?"),
    ("{file}:not_a_class", "not a torch.nn.Module subclass"),
    ("{file}:WrongForward", "WrongForward.forward must take (pred, target, ligand_ids=None), it takes (x)"),
    ("{file}:NeedsK", "needs k (its constructor has no default)"),
    ("no_such_package.losses:Thing", "no module 'no_such_package'"),
    ("infonse", "unknown loss 'infonse' (did you mean 'infonce'?)"),
])
def test_a_loss_that_cannot_be_used_is_one_line_naming_it(user_file, loss, message):
    with pytest.raises(AblateError) as info:
        validate(RunSpec, {"loss": loss.format(file=user_file)}, "study.toml", "experiments.mine")
    assert str(info.value).startswith("study.toml: experiments.mine")
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_a_file_that_fails_to_load_names_its_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\n\nx = 1 / 0\n")
    with pytest.raises(AblateError, match=r"bad.py failed to load: line 3: ZeroDivisionError"):
        losses.resolve(f"{bad}:Loss")


def _train(specs):
    split = load_split(specs[0].data)
    trainer = Trainer(specs, split.train, split.val, dtype=torch.float64)
    history: dict[int, list] = {m.index: [] for m in trainer.every}
    for results in trainer.array():
        for k, r in results.items():
            history[k].append(r)
    return trainer, history


def test_user_losses_train_in_an_array_beside_infonce_exactly_as_alone(user_file):
    specs = [tiny_run(loss="infonce", seed=0), tiny_run(loss=f"{user_file}:HardNegatives", seed=1, hardness=0.5),
             tiny_run(loss=f"{user_file}:HardNegatives", seed=2, hardness=0.5, lr=0.01),
             tiny_run(loss=f"{user_file}:Margin", seed=3), tiny_run(loss="siglip", seed=4)]
    trainer, history = _train(specs)
    groups = {tuple(g.members): g.mode for g in trainer.losses._groups}
    assert groups[(1, 2)] == "vmap"  # the two hard-negative members share their settings: vmapped together
    for k, spec in enumerate(specs):
        alone, alone_history = _train([spec])
        for a, b in zip(trainer.every[k].params, alone.every[0].params, strict=True):
            assert (a - b).abs().max().item() <= 1e-9, spec.loss
        for got, want in zip(history[k], alone_history[0], strict=True):
            assert got.metrics["train/loss"] == pytest.approx(want.metrics["train/loss"], rel=1e-9)


@pytest.mark.parametrize(("cls", "reason"), [
    ("Raises", "raised ValueError: this loss is broken"),
    ("NotScalar", "returned a tensor of shape [16], not a scalar"),
    ("NaNs", "returned NaN or inf on finite inputs"),
    ("Detached", "returned a value without a gradient"),
])
def test_a_user_loss_that_misbehaves_fails_its_run_alone(user_file, cls, reason):
    specs = [tiny_run(loss="infonce", seed=0), tiny_run(loss=f"{user_file}:{cls}", seed=1)]
    trainer, history = _train(specs)
    assert len(history[1]) == 1 and history[1][0].error.startswith(f"loss '{user_file}:{cls}' {reason}")
    alone, _alone_history = _train([specs[0]])  # the other member trains on, untouched
    assert len(history[0]) == 3
    for a, b in zip(trainer.every[0].params, alone.every[0].params, strict=True):
        assert (a - b).abs().max().item() <= 1e-9


def test_a_loss_from_an_installed_entry_point(tmp_path, user_file, monkeypatch):
    package = tmp_path / "site" / "acme_losses"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(USER_LOSSES)
    dist = tmp_path / "site" / "acme_losses-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-losses\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ablate.losses]\nacme-margin = acme_losses:Margin\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert "acme-margin" in losses.installed_names()
    spec = tiny_run(loss="acme-margin", margin=0.1)
    assert spec.loss_args == {"margin": 0.1, "weight": 1.0}
    history = list(Trainer.from_spec(spec).epochs())
    assert len(history) == 3 and math.isfinite(history[-1].metrics["train/loss"])
    proc = subprocess.run([sys.executable, "-m", "ablate", "train", "--help"], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site"), "COLUMNS": "300"})
    assert "path/file.py:Class" in proc.stdout


def test_a_suite_trains_a_user_loss_from_a_file_beside_infonce_through_an_array(workdir, monkeypatch, capsys,
                                                                                 user_file):
    study = workdir / "mine.toml"
    study.write_text(textwrap.dedent(f"""
        kind = "suite"
        objective = "test/top1"
        baseline = "infonce"
        seeds = [0, 1]
        [base]
        epochs = 2
        batch_size = 16
        model = {{ hidden = [16] }}
        data = {{ source = "pairs.npz" }}
        [experiments.infonce]
        loss = "infonce"
        [experiments.hard]
        loss = "{user_file}:HardNegatives"
        hardness = 0.5
        [experiments.broken]
        loss = "{user_file}:Raises"
    """))
    code, _out, err = run_cli(["run-suite", str(study), "--jobs", "1", "--array", "6", "--set", "hardness=0.7"],
                             monkeypatch, capsys)
    assert code == 1 and "2 trial(s) failed: broken s0, broken s1" in err, err  # the others completed
    url = f"sqlite:///{workdir / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(url)
    by_experiment: dict[str, set[str]] = {}
    for t in optuna.load_study(study_name=summary.study_name, storage=url).trials:
        by_experiment.setdefault(records.fixed_params(t)["experiment"], set()).add(t.state.name)
    assert by_experiment == {"infonce": {"COMPLETE"}, "hard": {"COMPLETE"}, "broken": {"FAIL"}}
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    hard = [r for r in runs if r.data.tags.get("ablate.loss", "").endswith(":HardNegatives")]
    assert len(hard) == 2 and all(r.data.params["hardness"] == "0.7" for r in hard)
    assert all(r.data.tags.get("ablate.array_size") for r in hard)  # trained in an array
    broken = [r for r in runs if r.data.tags.get("ablate.loss", "").endswith(":Raises")]
    assert {r.info.status for r in broken} == {"FAILED"}
    assert all("raised ValueError: this loss is broken" in r.data.tags["ablate.stop_reason"] for r in broken)


def test_ablate_train_takes_a_user_loss_and_its_settings_and_names_a_failing_one(workdir, monkeypatch, capsys,
                                                                                  user_file):
    code, _, err = run_cli(["train", "--loss-fn", f"{user_file}:Margin", "--set", "margin=0.4", "--epochs", "2",
                              "--data", "pairs.npz", "--set", "model.hidden=[16]"], monkeypatch, capsys)
    assert code == 0, err
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ablate").experiment_id])
    assert run.data.params["margin"] == "0.4" and run.data.params["weight"] == "1.0"
    code, _out, err = run_cli(["train", "--loss-fn", f"{user_file}:NotScalar", "--epochs", "2", "--data", "pairs.npz",
                              "--set", "model.hidden=[16]"], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "NotScalar' returned a tensor of shape [32], not a scalar" in lines[0] and "ended FAILED" in lines[0]


def test_a_search_searches_a_user_losss_own_setting(user_file):
    from ablate.study.designs import from_document

    doc = {"kind": "search", "name": "margins", "objective": "val/mrr", "n_trials": 2,
           "base": {"loss": f"{user_file}:Margin", "epochs": 1},
           "params": {"margin": {"type": "float", "low": 0.05, "high": 0.5}}}
    spec = from_document(doc)
    trial = optuna.create_study().ask()
    assert spec.suggest(trial).run.loss_args["margin"] == trial.params["margin"]
    doc["params"] = {"margn": {"type": "float", "low": 0.05, "high": 0.5}}
    with pytest.raises(AblateError, match=r"'margn' is not a run field; valid fields: .*margin"):
        from_document(doc)


def test_the_infonce_vs_siglip_study_pairs_each_batch_size_into_one_array():
    from ablate.study.studyfiles import load_study
    from ablate.training.preflight import fusion_key

    spec = load_study("infonce-vs-siglip", {}, epochs=4)
    assert spec.baseline == "infonce-b32" and len(spec.experiments) == 6
    keys = {fusion_key(run) for run in spec.experiments.values()}
    assert len(keys) == 3  # InfoNCE and SigLIP at the same batch size can train as one array
    assert {e: r.batch_size for e, r in spec.experiments.items() if r.loss == "siglip"} == {
        "siglip-b16": 16, "siglip-b32": 32, "siglip-b64": 64}


def test_a_built_in_losss_definition_read_from_its_source_equals_its_class():
    """Validating a run reads a built-in loss from its module's source (no torch); the class says the same."""
    for name in losses.builtin_names():
        static = losses.resolve(name)
        live = losses._define(name, static.cls, builtin=True)
        assert (static.fields, static.defaults, static.declared, static.has_check) == (
            live.fields, live.defaults, live.declared, live.has_check), name
        assert static.annotations == live.annotations or name == "multistage", name  # lrs: a tuple either way


def test_validating_runs_of_every_built_in_loss_imports_no_torch():
    code = ("import sys; from ablate import losses; from ablate.specs import RunSpec; "
            "[RunSpec(loss=n) for n in losses.builtin_names()]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_loss_that_keeps_state_trains_one_member_at_a_time_each_as_alone(user_file):
    specs = [tiny_run(loss=f"{user_file}:Warmup", seed=0), tiny_run(loss=f"{user_file}:Warmup", seed=1)]
    trainer, history = _train(specs)
    assert [g.mode for g in trainer.losses._groups] == ["loop"]  # not functional: never vmapped
    for k, spec in enumerate(specs):
        alone, alone_history = _train([spec])
        for a, b in zip(trainer.every[k].params, alone.every[0].params, strict=True):
            assert (a - b).abs().max().item() <= 1e-9
        assert [r.metrics["val/loss"] for r in history[k]] == pytest.approx(
            [r.metrics["val/loss"] for r in alone_history[0]], rel=1e-9)


def test_validation_takes_a_contrastive_users_loss_in_training_sized_batches_also_beside_mse(user_file):
    data = DataSpec(synthetic=TINY.model_copy(update={"n_ligands": 200}))
    specs = [tiny_run(loss=f"{user_file}:SmallBatches", seed=0, data=data), tiny_run(loss="mse", seed=1, data=data)]
    assert len(load_split(specs[0].data).val) > 64  # the whole validation set would be refused as one batch
    _trainer, history = _train(specs)
    assert all(r.error is None for r in history[0]) and len(history[0]) == 3


def test_a_suite_base_may_set_a_user_losss_setting_that_its_mse_experiment_does_not_read(tmp_path, user_file):
    from ablate.study.designs import from_document

    doc = {"kind": "suite", "name": "mixed", "seeds": [0], "baseline": "mse",
           "base": {"margin": 0.3, "epochs": 2},
           "experiments": {"mse": {"loss": "mse"}, "margin": {"loss": f"{user_file}:Margin"}}}
    spec = from_document(doc)
    assert spec.experiments["margin"].loss_args["margin"] == 0.3 and spec.experiments["mse"].loss_args == {}
    assert "loss_args" not in spec.identity()["experiments"]["mse"]  # a study's name is what it was before


def test_a_search_over_the_loss_itself_may_start_from_a_loss_with_settings_of_its_own():
    from ablate.study.designs import from_document

    doc = {"kind": "search", "name": "l", "objective": "val/mrr", "n_trials": 2, "base": {"loss": "siglip",
           "epochs": 2}, "params": {"loss": {"type": "categorical", "choices": ["infonce", "siglip"]}}}
    runs = {run.loss: run for _, run in from_document(doc).preflight_runs()}
    assert runs["infonce"].loss_args == {} and runs["siglip"].loss_args["siglip_scale"] == 10.0
