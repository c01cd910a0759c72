"""Every setting is declared once (lightning_ksm.config) and a bad value fails at construction, with a
message naming the setting: in the callback (flat keywords and the harvest=/analysis= objects), the
RL adapter and the harvest runner. (The command line's checks are in test_cli.py.)"""

import dataclasses

import pytest

from lightning_ksm import AnalysisConfig, HarvestConfig, TaskAttribution
from lightning_ksm.config import describe

# A value every setting rejects: a string for numbers and choices, a number for patterns.
BAD = {row["name"]: (3 if row["name"] in ("include", "exclude") else "not-a-valid-value")
       for cls in (HarvestConfig, AnalysisConfig) for row in describe(cls)}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_value_of_every_setting_fails_at_construction_naming_it(name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        TaskAttribution(**{name: BAD[name]})
    owner = HarvestConfig if name in {f.name for f in dataclasses.fields(HarvestConfig)} else AnalysisConfig
    key = "harvest" if owner is HarvestConfig else "analysis"
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        TaskAttribution(**{key: {name: BAD[name]}})
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        TaskAttribution(**{key: owner(**{name: BAD[name]})})


@pytest.mark.parametrize("kwargs, name", [
    ({"seed": "x"}, "seed"), ({"gamma": -1}, "gamma"), ({"alpha": 0}, "alpha"),
    ({"best_subset_size": 0}, "best_subset_size"), ({"n_subsets": 3}, "n_subsets"),
    ({"subset_p": 1.0}, "subset_p"), ({"lam": 0}, "lam"), ({"proj_dim": 0}, "proj_dim"),
    ({"best_subset_size": 5, "task_names": ["a", "b", "c"]}, "best_subset_size"),
    ({"subset_size": 4, "task_names": [0, 1, 2]}, "subset_size"),
])
def test_the_issue_cases(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TaskAttribution(**kwargs)


def test_an_impossible_best_subset_size_fails_before_the_first_step(tmp_path):
    """Without task_names, K is known at train start: the check runs there, before any step."""
    import lightning.pytorch as L

    from lit_problem import TinyNet, loaders, make_data

    steps = []

    class Count(L.Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    train, val = make_data()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
                        callbacks=[TaskAttribution(best_subset_size=9, progress=False), Count()])
    with pytest.raises(ValueError, match=r"best_subset_size must be between 1 and the number of tasks \(4\)"):
        trainer.fit(TinyNet(), *loaders(train, val))
    assert not steps


def test_flat_keywords_override_the_settings_objects_and_unknown_keys_are_named():
    cb = TaskAttribution(analysis={"n_subsets": 30, "kernel": "poly"}, n_subsets=50, harvest=HarvestConfig(proj_dim=8))
    assert cb.analysis == AnalysisConfig(n_subsets=50, kernel="poly") and cb.harvest.proj_dim == 8
    assert cb.proj_dim == 8 and cb.projection == HarvestConfig().projection
    with pytest.raises(ValueError, match=r"unknown analysis setting\(s\) \['lamda'\]"):
        TaskAttribution(analysis={"lamda": 1})
    with pytest.raises(TypeError, match="harvest must be a HarvestConfig or a dict"):
        TaskAttribution(harvest=3)


RL_BAD = {"n_per_task": 0, "targets": "teacher", "projection": "fft", "proj_dim": 0, "action_step": 0,
          "ridge": -1, "weighting": "x", "n_subsets": 2, "subset_size": -1, "subset_p": 2.0, "episodes": 0,
          "rollout_seed": -1, "max_episode_steps": 0, "seed": "x", "kernel": "x", "gamma": 0, "alpha": -1,
          "holdout": 0.95, "ensemble_samples": 0, "n_groups": 0, "best_subset_size": 0, "top_k": 0,
          "proj_seed": "x"}


def test_every_rl_setting_is_checked_at_construction():
    pytest.importorskip("metaworld")
    from lightning_ksm.rl import RLAttributionConfig, RLTaskAttribution

    assert set(RL_BAD) == {f.name for f in dataclasses.fields(RLAttributionConfig)}
    for name, value in RL_BAD.items():
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            RLTaskAttribution(snapshot_at=10, config={name: value})
    # shared settings reuse the supervised declaration (same help and check), with RL defaults
    rl = {f.name: f for f in dataclasses.fields(RLAttributionConfig)}
    an = {f.name: f for f in dataclasses.fields(AnalysisConfig)}
    assert rl["kernel"].metadata["check"] is an["kernel"].metadata["check"] and rl["n_subsets"].default == 40
