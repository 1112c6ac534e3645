"""Trial arrays: members trained together equal the same runs trained alone, exactly (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from support import tiny_run

from ablate.training.arrays import choose, clearing_size
from ablate.training.preflight import fusion_key
from ablate.training.splits import load_split
from ablate.training.trainer import Trainer

TOL = 1e-9


def _split(spec):
    split = load_split(spec.data)
    return split.train, split.val


def _train(specs, **kw):
    train, val = _split(specs[0])
    trainer = Trainer(specs, train, val, dtype=torch.float64, **kw)
    history: dict[int, list] = {m.index: [] for m in trainer.every}
    for results in trainer.array():
        for k, r in results.items():
            history[k].append(r)
    return trainer, history


def _params(trainer, k):
    member = trainer.every[k]
    return [p.detach().clone() for p in member.params]


def _assert_alone(trainer, history, specs, skip=()):
    for k, spec in enumerate(specs):
        if k in skip:
            continue
        alone, alone_history = _train([spec])
        for a, b in zip(_params(trainer, k), _params(alone, 0), strict=True):
            assert (a - b).abs().max().item() <= TOL, (k, spec.loss)
        assert len(history[k]) == len(alone_history[0])
        for got, want in zip(history[k], alone_history[0], strict=True):
            for key in ("train/loss", "grad_norm", "lr", "val/loss"):
                assert got.metrics[key] == pytest.approx(want.metrics[key], rel=1e-9, abs=1e-12), (k, key)
            assert got.stage == want.stage


MEMBERS = [
    dict(loss="mse", seed=0, lr=1e-2),
    dict(loss="cosine", seed=1, lr=3e-3, weight_decay=0.1),
    dict(loss="infonce", seed=2, temperature=0.1),
    dict(loss="infonce", seed=3, temperature=0.2, learnable_temperature=True, lr=0.05),
    dict(loss="combined", seed=4, alpha=0.6, beta=0.3, gamma=0.1, grad_clip=0.05),
    dict(loss="multistage", seed=5, stage1_epochs=1, stage2_epochs=1, stage_lrs=(1e-2, 5e-3, 2e-3)),
    dict(loss="infonce", seed=6, symmetric=False, mask_shared_ligands=False, lr_schedule="cosine", warmup_epochs=1),
]


def test_every_member_of_a_stacked_array_equals_its_run_alone():
    specs = [tiny_run(**m) for m in MEMBERS]
    assert len({fusion_key(s) for s in specs}) == 1
    trainer, history = _train(specs)
    assert trainer.models.fusion == "stacked"
    assert [r.stage for r in history[5]] == ["mse_warmup", "contrastive", "finetune"]
    _assert_alone(trainer, history, specs)


def test_gradcache_arrays_equal_their_runs_alone():
    specs = [tiny_run(batch_size=8, accumulation_steps=2, **m) for m in (MEMBERS[0], MEMBERS[2], MEMBERS[4])]
    trainer, history = _train(specs)
    _assert_alone(trainer, history, specs)


def test_a_member_that_diverges_stops_and_changes_no_other_member():
    specs = [tiny_run(**MEMBERS[2]), tiny_run(loss="infonce", seed=9, lr=1e300), tiny_run(**MEMBERS[4])]
    trainer, history = _train(specs)
    assert history[1][-1].diverged and len(history[1]) < 3
    assert not math.isfinite(history[1][-1].metrics["train/loss"])
    assert all(math.isfinite(r.metrics["train/loss"]) for k in (0, 2) for r in history[k])
    assert [m.index for m in trainer.members] == [0, 2]  # the diverged member was dropped
    _assert_alone(trainer, history, specs, skip={1})


DROPOUT = {"hidden": [16], "dropout": 0.3}


def test_with_dropout_every_member_draws_its_own_masks_as_it_does_alone():
    """Dropout > 0: each member's masks come from its own stream, so members still equal their runs alone,
    through GradCache's replay too, and a member that diverges and is dropped changes no other's masks."""
    plain = [tiny_run(model=DROPOUT, **m) for m in MEMBERS]
    trainer, history = _train(plain)
    assert trainer.models.fusion == "stacked"
    _assert_alone(trainer, history, plain)
    cached = [tiny_run(model=DROPOUT, batch_size=8, accumulation_steps=2, **m) for m in (MEMBERS[2], MEMBERS[4])]
    _assert_alone(*_train(cached), cached)
    diverging = [tiny_run(model=DROPOUT, **MEMBERS[2]), tiny_run(model=DROPOUT, loss="infonce", seed=9, lr=1e300),
                 tiny_run(model=DROPOUT, **MEMBERS[4])]
    trainer, history = _train(diverging)
    assert [m.index for m in trainer.members] == [0, 2] and len(history[1]) < 3
    _assert_alone(trainer, history, diverging, skip={1})


def test_a_stopped_member_is_dropped_and_the_others_train_on_unchanged():
    specs = [tiny_run(**MEMBERS[0]), tiny_run(**MEMBERS[2]), tiny_run(**MEMBERS[3])]
    train, val = _split(specs[0])
    trainer = Trainer(specs, train, val, dtype=torch.float64)
    history: dict[int, list] = {0: [], 1: [], 2: []}
    for results in trainer.array():
        for k, r in results.items():
            history[k].append(r)
        if len(history[1]) == 1:
            trainer.stop(1)
    assert [len(history[k]) for k in range(3)] == [3, 1, 3]
    _assert_alone(trainer, history, specs, skip={1})


def test_a_dropped_member_keeps_its_weights_and_frees_the_stacked_tensors():
    from ablate.training.models import MemberModels, ProjectionHead

    def storage_bytes(p):
        return p.untyped_storage().nbytes()

    heads = [ProjectionHead(4, 3, (5,)) for _ in range(3)]
    models = MemberModels(heads)
    assert models.fusion == "stacked"
    assert all(storage_bytes(p) == 3 * p.nbytes for p in heads[1].parameters())  # views of the stacks of 3
    before = [p.detach().clone() for p in heads[1].parameters()]
    models.keep([0, 2])
    assert all(storage_bytes(p) == p.nbytes for p in heads[1].parameters())  # its own now
    assert all(torch.equal(a, b) for a, b in zip(before, heads[1].parameters(), strict=True))
    assert all(storage_bytes(p) == 2 * p.nbytes for p in heads[0].parameters())  # the kept: views of stacks of 2
    models.keep([1])  # one member left: it trains alone, on tensors of its own
    assert models.fusion == "loop"
    assert all(storage_bytes(p) == p.nbytes for h in heads for p in h.parameters())


def test_an_array_whose_members_all_stop_together_ends_cleanly():
    """As a worker ends an array: every member stopped after its last epoch, then the loop resumes once more."""
    specs = [tiny_run(**MEMBERS[0]), tiny_run(**MEMBERS[2])]
    train, val = _split(specs[0])
    trainer = Trainer(specs, train, val)
    assert trainer.models.fusion == "stacked"
    epochs = []
    for results in trainer.array():
        epochs.append(sorted(results))
        for k in results:
            if len(epochs) == 2:  # both stop at once, before their last epoch (as pruned together)
                trainer.stop(k)
    assert epochs == [[0, 1], [0, 1]]
    assert trainer.members == []


def test_user_models_run_vmapped_and_equal_their_runs_alone():
    model = {"factory": "support:two_layer", "kwargs": {"hidden": 10}}
    specs = [tiny_run(model=model, **m) for m in (MEMBERS[0], MEMBERS[3], MEMBERS[4])]
    trainer, history = _train(specs)
    assert trainer.models.fusion == "vmap" and trainer.fallback is None
    _assert_alone(trainer, history, specs)


def test_a_user_model_with_dropout_draws_different_masks_per_member_under_vmap():
    """The built-in head inside a user's module: vmapped, its dropout from torch's stream, per member."""
    specs = [tiny_run(model={"factory": "support:wrapped_head"}, seed=0) for _ in range(2)]
    trainer, history = _train(specs)
    assert trainer.models.fusion == "vmap" and trainer.fallback is None
    assert all(math.isfinite(r.metrics["train/loss"]) for k in (0, 1) for r in history[k])
    # the same seed, the same data order: only the members' dropout masks tell them apart
    assert any((a - b).abs().max().item() > 1e-6 for a, b in zip(_params(trainer, 0), _params(trainer, 1), strict=True))


def test_a_model_that_cannot_be_vmapped_falls_back_to_separate_members_and_says_why():
    specs = [tiny_run(model={"factory": "support:data_dependent"}, **m) for m in (MEMBERS[0], MEMBERS[2])]
    trainer, history = _train(specs)
    assert trainer.models.fusion == "loop"
    assert trainer.fallback
    _assert_alone(trainer, history, specs)


def test_runs_that_differ_in_what_shapes_the_computation_cannot_share_an_array():
    with pytest.raises(ValueError, match="must agree on model, batch size"):
        train, val = _split(tiny_run())
        Trainer([tiny_run(batch_size=16), tiny_run(batch_size=8)], train, val)


@pytest.mark.slow
def test_an_interrupted_array_leaves_each_member_fail_and_killed_and_resumes(workdir, monkeypatch, capsys):
    import optuna
    from mlflow import MlflowClient
    from support import run_cli

    from ablate.study import records, studies

    args = ["run-suite", "baseline-vs-multistage", "--epochs", "4", "--seeds", "0,1", "--jobs", "1", "--array", "4",
            "--data", "pairs.npz", "--set", "model.hidden=[16]"]
    real = Trainer.array

    def interrupted(self):
        for epoch, results in enumerate(real(self)):
            if epoch == 2 and len(self.specs) > 1:
                raise KeyboardInterrupt
            yield results

    monkeypatch.setattr(Trainer, "array", interrupted)
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 130, err
    ref = studies.load("baseline-vs-multistage", studies.open_storage(f"sqlite:///{workdir / 'optuna.db'}"))
    failed = ref.study.get_trials(states=(optuna.trial.TrialState.FAIL,))
    assert len(failed) == 4  # the whole array
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for t in failed:
        run = client.get_run(t.user_attrs[records.RUN_ID])
        assert run.info.status == "KILLED"
        assert run.data.tags["ablate.array_size"] == "4"
        assert len(client.get_metric_history(run.info.run_id, "val/top1")) == 2
        assert t.user_attrs[records.ERROR].startswith("interrupted")

    monkeypatch.setattr(Trainer, "array", real)
    code, _, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    complete = ref.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len({(t.params["experiment"], t.params["seed"]) for t in complete}) == 10
    # each interrupted member continued its own run from the checkpoint it left (after epoch 1)
    for t in failed:
        (again,) = [c for c in complete if c.user_attrs.get(records.RESUMES) == t.number]
        run = client.get_run(again.user_attrs[records.RUN_ID])
        assert run.info.run_id == t.user_attrs[records.RUN_ID]
        assert run.data.tags["ablate.resumed_from_epoch"] == "2"
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val/top1")) == [0, 1, 2, 3]


# `--array auto`: how many compatible trials train together


def test_the_size_that_trains_the_waiting_trials_soonest_is_chosen():
    # measured on the README suite's batch-32 experiments under load: 8 members step fastest per member,
    # but arrays of 8 leave the ninth trial to train alone afterwards
    rates = {1: 698.0, 2: 1045.0, 4: 1533.0, 8: 1832.0, 9: 1618.0}
    assert clearing_size(rates, 9) == 9
    assert clearing_size(rates, 16) == 8  # two full arrays of 8
    assert clearing_size({1: 500.0, 2: 400.0, 3: 450.0}, 3) == 1  # fusing does not pay: one at a time
    assert clearing_size({1: 100.0}, 7) == 1
    assert clearing_size({1: 100.0, 2: 105.0}, 4) == 1  # 5 % faster is within noise: not worth fusing
    assert clearing_size({1: 100.0, 2: 115.0}, 4) == 2
    assert clearing_size({1: 100.0, 2: 115.0}, 4, margin=0.2) == 1


def test_the_arrays_are_planned_for_the_workers_that_share_the_trials():
    # two workers, six trials: one array of six would leave the second worker idle; two arrays of three clear them
    rates = {1: 100.0, 2: 170.0, 4: 240.0, 6: 260.0, 3: 210.0}
    assert clearing_size(rates, 6, workers=1) == 6
    assert clearing_size(rates, 6, workers=2) == 3
    assert clearing_size(rates, 2, workers=2) == 1  # each worker takes one


def test_auto_measures_on_the_real_data_and_says_what_it_chose():
    run = tiny_run(loss="infonce", epochs=400)  # enough work queued for measuring to pay
    state = torch.get_rng_state()
    choice = choose(run, waiting=3, array=None)
    assert torch.equal(torch.get_rng_state(), state)  # measuring leaves the random state as it was
    assert 1 <= choice.size <= 3
    assert choice.reason.startswith("member-epochs/s by array size {1: ")
    assert f"arrays of {choice.size} " in choice.reason
    assert choose(run, waiting=3, array=2).size == 2 and choose(run, waiting=1, array=None).size == 1


def test_auto_does_not_measure_when_the_work_queued_cannot_pay_for_it():
    from ablate.training import arrays

    run = tiny_run(loss="infonce", epochs=10)
    choice = choose(run, waiting=15, array=None, workers=2)  # 75 member-epochs each; measuring 1 and 2 costs 9
    assert choice.size == 1 and "too little work for measuring array sizes to pay" in choice.reason
    assert arrays._affordable([1, 2, 4, 8, 15], budget=0.05 * 15 * 300) == [1, 2, 4, 8, 15]  # the README suite
    assert arrays._affordable([1, 2, 4, 8, 15], budget=0.05 * 15 * 30 / 2) == [1, 2]
    assert arrays._affordable([1, 2, 4, 8, 15], budget=0.05 * 15 * 60) == [1, 2, 4, 8]
