"""An objective as plain data, and DistillationModule.load_from_checkpoint rebuilding it."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader, TensorDataset

from gompertz_kd.config import CONFIG_DIR
from gompertz_kd.module import DistillationModule
from gompertz_kd.objectives import KD, Objective, Term, objective_from_spec
from gompertz_kd.schedules import Gompertz
from gompertz_kd.train import build_objective

from helpers import cpu_trainer

METHODS = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))


def objective_of(method: str, *overrides: str) -> Objective:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return build_objective(compose("train", overrides=[f"method={method}", *overrides]))


def indexed_loader(n=8, num_classes=10, batch_size=4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(images, labels, torch.arange(n)), batch_size=batch_size)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_config_round_trips_through_its_spec(method):
    objective = objective_of(method)
    spec = objective.spec()
    assert json.loads(json.dumps(spec)) == spec  # plain data only
    rebuilt = objective_from_spec(spec)
    assert rebuilt.spec() == spec
    assert rebuilt.names == objective.names
    assert rebuilt.scales == objective.scales and rebuilt.schedules == objective.schedules
    assert rebuilt.weights_at(0.4) == objective.weights_at(0.4)
    for name in objective.names:
        assert type(rebuilt.terms[name]) is type(objective.terms[name])


def test_a_spec_records_schedule_objects_and_nested_arguments():
    objective = Objective(
        {"kd": {"term": KD(temperature=2.0), "scale": 0.5, "schedule": Gompertz(b=5.0)}},
        schedule=Gompertz(w_max=0.9),
    )
    spec = objective.spec()
    assert spec["terms"]["kd"]["term"] == {
        "_target_": "gompertz_kd.objectives.kd.KD",
        "temperature": 2.0,
    }
    assert spec["terms"]["kd"]["schedule"]["_target_"] == "gompertz_kd.schedules.Gompertz"
    rebuilt = objective_from_spec(spec)
    assert rebuilt.schedules["kd"] == Gompertz(b=5.0)
    assert rebuilt.weights_at(0.3) == objective.weights_at(0.3)


@pytest.mark.parametrize(
    "target",
    ["os.system", "builtins.eval", "gompertz_kd.module.DistillationModule", "gompertz_kd.nope.X"],
)
def test_a_spec_naming_anything_but_a_term_objective_or_schedule_is_refused(target):
    with pytest.raises(ValueError, match="spec: "):
        objective_from_spec({"_target_": target, "command": "echo hi"})
    nested = {
        "_target_": "gompertz_kd.objectives.objective.Objective",
        "terms": {"kd": {"term": {"_target_": target}}},
    }
    with pytest.raises(ValueError, match="spec: "):
        objective_from_spec(nested)


class _TensorArgument(Term):
    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, step):
        return (step.student.logits * self.weights).sum() * 0


def test_an_objective_with_unrecordable_arguments_warns_and_needs_objective_on_load(tmp_path):
    objective = Objective({"w": {"term": _TensorArgument(torch.ones(10))}})
    with pytest.raises(TypeError, match=r"_TensorArgument.weights: cannot record a Tensor"):
        objective.spec()
    with pytest.warns(UserWarning, match="cannot be recorded in checkpoints"):
        module = DistillationModule("resnet8", "resnet14", 10, objective=objective)
    assert module.hparams["objective"] is None


@pytest.mark.parametrize("method", ["ofd", "vid", "crd", "gompertz_cnn"])
def test_load_from_checkpoint_rebuilds_the_objective_the_checkpoint_was_trained_with(
    method, tmp_path
):
    torch.manual_seed(0)
    objective = objective_of(method, "model=resnet20_resnet8")
    module = DistillationModule("resnet8", "resnet20", 10, objective=objective, num_train_samples=8)
    trainer = cpu_trainer(max_steps=2, default_root_dir=tmp_path)
    trainer.fit(module, indexed_loader())
    path = tmp_path / "step.ckpt"
    trainer.save_checkpoint(path)

    loaded = DistillationModule.load_from_checkpoint(path)  # no objective passed

    assert loaded.objective.spec() == objective.spec()
    assert loaded.objective.names == objective.names
    expected, got = module.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    images, targets = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    module.eval(), loaded.eval()
    a = module.compute_losses(images, targets, indices=torch.arange(4))[1]
    b = loaded.compute_losses(images, targets, indices=torch.arange(4))[1]
    for name in a:
        if name != "loss_crd":  # CRD's forward moves its memory bank: compared by state above
            torch.testing.assert_close(a[name], b[name])
