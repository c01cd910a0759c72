"""The RL adapter: Meta-World runner, replay buffer, SAC module, evaluation, attribution, recipe.

Skipped when the optional ``rl`` extra (gymnasium, metaworld) is missing.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("metaworld")
pytest.importorskip("lightning")

from lightning_ksm.features import HarvestedFeatures  # noqa: E402
from lightning_ksm.harvesting.projection import make_projector  # noqa: E402
from lightning_ksm.rl import (  # noqa: E402
    MT10_TASKS,
    Actor,
    MultiTaskEnv,
    ReplayBuffer,
    RLAttributionConfig,
    SACModule,
    attribute_policy,
    evaluate_policy,
    make_metaworld_envs,
    resolve_env_names,
)
from lightning_ksm.rl.attribution import (  # noqa: E402
    PolicyGradEx,
    back_project,
    harvest_policy_features,
    policy_params_from_solutions,
    top_partners,
)

TASKS = ["reach-v3", "window-close-v3", "door-open-v3"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Small networks on a shared 2-core machine: one torch thread is several times faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trainer(tmp_path):
    import lightning.pytorch as L

    return L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)


CALLBACK_CONFIG = dict(n_per_task=16, proj_dim=8, n_subsets=10, subset_size=0, ensemble_samples=200, top_k=1,
                       max_episode_steps=5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny SAC run on 3 tasks with the RL attribution callback (shared by several tests; ~6 s)."""
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger

    from lightning_ksm.rl import RLTaskAttribution

    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sac")
    module = SACModule(TASKS, hidden=(32, 32), batch_size=32, steps=150, warmup_steps=50,
                       max_episode_steps=20, seed=0, log_every=1000, buffer_size=5000)
    callback = RLTaskAttribution(snapshot_at=100, config=CALLBACK_CONFIG)
    trainer = L.Trainer(max_epochs=1, logger=CSVLogger(root), enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=root, callbacks=[callback])
    trainer.fit(module)
    return module, callback, trainer


@pytest.fixture(scope="module")
def trained(run):
    return run[0]


# -- environments ----------------------------------------------------------------------------------


def test_env_names_are_checked_before_anything_is_built():
    assert resolve_env_names("mt10") == list(MT10_TASKS)
    assert resolve_env_names(["reach-v3-goal-observable"]) == ["reach-v3"]
    with pytest.raises(ValueError, match=r"unknown Meta-World environment name\(s\) \['rech-v3'\].*reach-v3"):
        SACModule(["rech-v3", "push-v3"])
    with pytest.raises(ValueError, match="no environments"):
        SACModule([])
    with pytest.raises(ValueError, match="no environments"):
        make_metaworld_envs([])
    with pytest.raises(ValueError, match="listed twice"):
        resolve_env_names(["push-v3", "push-v3"])
    with pytest.raises(TypeError, match=r"names\[1\] must be a string"):
        resolve_env_names(["push-v3", 3])
    with pytest.raises(ValueError, match="active_tasks is empty"):
        SACModule(TASKS, active_tasks=[])
    with pytest.raises(ValueError, match=r"\['push-v3'\] are not among the run's tasks"):
        SACModule(TASKS, active_tasks=["push-v3"])


class _ToyEnv:
    """A gymnasium-style env with another observation shape."""

    def __init__(self, obs_dim=5):
        import gymnasium as gym

        self.observation_space = gym.spaces.Box(-1, 1, (obs_dim,), dtype=np.float64)
        self.action_space = gym.spaces.Box(-1, 1, (4,), dtype=np.float32)

    def reset(self, seed=None):
        return np.zeros(self.observation_space.shape), {}


def test_mismatched_observation_spaces_are_rejected():
    envs = make_metaworld_envs(["reach-v3"])
    envs["toy"] = _ToyEnv()
    with pytest.raises(ValueError, match=r"environment 'toy' has observation shape \(5,\) but 'reach-v3' has \(39,\)"):
        MultiTaskEnv(envs)
    with pytest.raises(ValueError, match="envs is empty"):
        MultiTaskEnv({})


def test_runner_truncates_at_the_limit_resets_and_is_seeded():
    a = MultiTaskEnv(make_metaworld_envs(["reach-v3", "push-v3"], seed=3), max_episode_steps=5)
    b = MultiTaskEnv(make_metaworld_envs(["reach-v3", "push-v3"], seed=3), max_episode_steps=5)
    c = MultiTaskEnv(make_metaworld_envs(["reach-v3"], seed=4), max_episode_steps=5)
    np.testing.assert_array_equal(a.obs, b.obs)  # same seed, same task instances
    assert not np.array_equal(a.obs[0, -3:], c.obs[0, -3:])  # another seed moves the goal
    first = a.obs.copy()
    rng = np.random.default_rng(0)
    total = np.zeros(2)
    for step in range(1, 6):
        res = a.step(rng.uniform(-1, 1, (2, 4)))
        total += res.rewards
        assert res.truncated.all() == (step == 5) and not res.terminated.any()
    assert [r for _, r, _ in a.finished] == pytest.approx(total.tolist())
    np.testing.assert_allclose(a.obs, first)  # reset to the (fixed-goal) start state
    assert (a.episode_steps == 0).all()
    # the default limit is the env's own 500 steps: stepping on never raises (Meta-World would)
    full = MultiTaskEnv(make_metaworld_envs(["reach-v3"]))
    truncated = [full.step(np.zeros((1, 4))).truncated[0] for _ in range(501)]
    assert truncated.count(True) == 1 and truncated[499]
    with pytest.raises(ValueError, match="exceeds the environments' own limit of 500"):
        MultiTaskEnv(make_metaworld_envs(["reach-v3"]), max_episode_steps=501)


# -- replay buffer ---------------------------------------------------------------------------------


def test_replay_buffer_keeps_task_ids_and_wraps():
    buf = ReplayBuffer(10, obs_dim=2, action_dim=1, n_tasks=3, seed=0)
    for t in (0, 1, 2, 0, 1, 2):
        obs = np.full((2, 2), float(t))  # each observation carries its task id
        buf.add(obs, np.zeros((2, 1)), np.full(2, t), obs, np.zeros(2), [t, t])
    assert len(buf) == 10  # 12 added, the 2 oldest overwritten
    np.testing.assert_array_equal(buf.task_counts(), [2, 4, 4])
    batch = buf.sample(64, tasks=[1])
    assert (batch["task_ids"] == 1).all() and (batch["obs"][:, 0] == 1).all()
    batch = buf.sample(256)
    assert torch.equal(batch["obs"][:, 0].long(), batch["task_ids"])
    assert torch.equal(batch["rewards"].long(), batch["task_ids"])
    idx = buf.per_task_indices(3, [2, 0], seed=1)
    assert buf.task_ids[idx].tolist() == [2, 2, 2, 0, 0]  # task 0 has only 2 left
    sub = buf.select_tasks([0])
    assert len(sub) == 2 and (sub.task_ids[:2] == 0).all()
    copy = ReplayBuffer(10, 2, 1, 3)
    copy.load_state_dict(buf.state_dict())
    assert torch.equal(copy.sample(8)["obs"], buf.sample(8)["obs"])  # same data, same sampler state
    with pytest.raises(ValueError, match=r"task_ids\[0\] = 3 is not in \[0, 3\)"):
        buf.add(np.zeros((1, 2)), np.zeros((1, 1)), [0], np.zeros((1, 2)), [0], [3])
    with pytest.raises(ValueError, match=r"no transition of tasks \[1\]"):
        sub.sample(1, tasks=[1])
    with pytest.raises(ValueError, match="empty"):
        ReplayBuffer(4, 2, 1, 3).sample(1)


# -- SAC -------------------------------------------------------------------------------------------


def test_actor_log_prob_is_the_tanh_gaussian_density():
    torch.manual_seed(0)
    actor = Actor(6, 3, (16,))
    x = torch.randn(5, 6)
    a, logp = actor.sample(x, generator=torch.Generator().manual_seed(1))
    mean, log_std = actor(x)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.exp()), [torch.distributions.TanhTransform()]
    )
    np.testing.assert_allclose(logp.detach(), dist.log_prob(a.clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1).detach(), rtol=1e-3, atol=1e-3)
    assert torch.equal(actor.deterministic(x), torch.tanh(mean))


def _random_batch(module, n=128, seed=0):
    rng = np.random.default_rng(seed)
    K = len(module.task_names)
    obs = rng.normal(size=(n, 39))
    module.buffer.add(obs, rng.uniform(-1, 1, (n, 4)), 5 + 3 * np.tanh(obs[:, 0]),
                      rng.normal(size=(n, 39)), np.zeros(n), rng.integers(0, K, n))
    return module.buffer.batch(np.arange(n))


def test_sac_update_lowers_the_critic_loss_and_tracks_the_target():
    module = SACModule(TASKS, hidden=(32, 32), seed=0, reward_scale=0.1, lr=1e-3, buffer_size=1000)
    batch = _random_batch(module)
    with torch.no_grad():
        before = float(module.critic_loss(batch))
    target_before = [p.clone() for p in module.critic_target.parameters()]
    module.update(batch)
    # Polyak update: target <- target + tau (critic - target), exactly
    for pt, p, old in zip(module.critic_target.parameters(), module.critic.parameters(), target_before):
        torch.testing.assert_close(pt, old + 0.005 * (p.detach() - old))
    for _ in range(200):
        module.update(batch)
    with torch.no_grad():
        after = float(module.critic_loss(batch))
    assert after < 0.25 * before, (before, after)


@pytest.mark.parametrize("target_entropy, direction", [(20.0, 1), (-20.0, -1)])
def test_entropy_temperature_is_tuned_toward_the_target(target_entropy, direction):
    module = SACModule(TASKS, hidden=(16,), seed=0, target_entropy=target_entropy, lr=1e-2, buffer_size=1000)
    batch = _random_batch(module)
    for _ in range(20):
        stats = module.update(batch)
    assert direction * (stats["alpha"] - 1.0) > 0.05  # alpha rises when entropy is below target
    # each task has its own temperature; all of them moved
    assert (direction * (module.log_alpha.detach().exp() - 1.0) > 0).all()


def test_training_collects_every_task_with_its_id_and_evaluates_per_task(trained):
    counts = trained.buffer.task_counts()
    np.testing.assert_array_equal(counts, [150, 150, 150])
    assert trained.updates == 100 and trained.iterations == 150
    # every observation of task t carries task t's goal (last 3 coordinates)
    n = len(trained.buffer)
    goals = {t: trained.buffer.obs[:n][trained.buffer.task_ids[:n] == t][:, -3:] for t in range(3)}
    for t in range(3):
        assert np.ptp(goals[t], axis=0).max() < 1e-6  # fixed goal per task
    assert np.abs(goals[0][0] - goals[1][0]).max() > 1e-3  # and the tasks' goals differ
    ev = trained.evaluate(episodes=1, seed=0)
    assert set(ev) == set(TASKS) | {"mean"}
    for t in TASKS:
        assert math.isfinite(ev[t]["return"]) and 0.0 <= ev[t]["success_rate"] <= 1.0
    assert ev["mean"]["return"] == pytest.approx(np.mean([ev[t]["return"] for t in TASKS]))
    assert trained.evaluate(episodes=1, seed=0) == ev  # deterministic policy, fixed goals
    # a subset's evaluation equals the same tasks in the full evaluation (tasks are independent)
    sub = evaluate_policy(trained.actor, trained.eval_envs(["door-open-v3"]))
    assert sub["door-open-v3"]["return"] == pytest.approx(ev["door-open-v3"]["return"])


def test_snapshot_continues_on_a_subset(trained, tmp_path):
    snap = trained.snapshot()
    clone = SACModule.from_snapshot(snap, active_tasks=["door-open-v3"], steps=20)
    for (n, a), b in zip(trained.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), n
    assert len(clone.buffer) == len(trained.buffer) and clone.updates == trained.updates
    _trainer(tmp_path).fit(clone)
    # only the active task was collected; the other tasks' counts are unchanged
    np.testing.assert_array_equal(clone.buffer.task_counts(), [150, 150, 170])
    with pytest.raises(ValueError, match=r"unknown override\(s\) \['hiden'\]"):
        SACModule.from_snapshot(snap, hiden=(8,))


def test_runs_from_one_snapshot_do_not_change_it_or_each_other(trained, tmp_path):
    """Real retraining from W0 must start every run from the same W0 (optimizer moments included)."""
    import copy

    snap = trained.snapshot()
    before = copy.deepcopy(snap["optimizers"])
    finals = []
    for _ in range(2):
        clone = SACModule.from_snapshot(snap, active_tasks=["door-open-v3"], steps=10, seed=3)
        _trainer(tmp_path).fit(clone)
        finals.append([p.detach().clone() for p in clone.actor.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)
    for opt_before, opt_after in zip(before, snap["optimizers"]):
        for i, st in opt_before["state"].items():
            for name, value in st.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_after["state"][i][name])), (i, name)


def test_lightning_checkpoint_carries_the_replay_buffer(run, tmp_path):
    module, _, trainer = run
    path = tmp_path / "sac.ckpt"
    trainer.save_checkpoint(path)
    loaded = SACModule.load_from_checkpoint(path)
    assert loaded.task_names == TASKS and loaded.iterations == module.iterations == 150
    np.testing.assert_array_equal(loaded.buffer.task_counts(), module.buffer.task_counts())
    n = len(module.buffer)
    np.testing.assert_array_equal(loaded.buffer.obs[:n], module.buffer.obs[:n])
    for a, b in zip(module.actor.parameters(), loaded.actor.parameters()):
        assert torch.equal(a, b)


# -- attribution adapter ---------------------------------------------------------------------------


def test_back_projection_is_the_transpose_of_the_projection():
    proj = make_projector("gaussian", {"w": (4, 3), "b": (4,)}, 6, seed=2)
    Z = torch.randn(3, 6, dtype=torch.float64)
    out = back_project(proj, Z)
    flat = torch.cat([out["w"].reshape(3, -1), out["b"].reshape(3, -1)], dim=1)
    torch.testing.assert_close(flat, Z @ proj.materialize())
    with pytest.raises(ValueError, match=r"Z must have shape \(m, k=6\)"):
        back_project(proj, Z[:, :5])


def test_estimated_policy_matches_the_linearized_policy(trained):
    """W0 + P^T z moves the actions by J z to first order (harvest and back-projection agree)."""
    feats, proj = harvest_policy_features(trained, n_per_task=8, proj_dim=24, seed=0)
    assert isinstance(feats, HarvestedFeatures) and feats.jacobians.shape == (24, 4, 24)
    assert (np.abs(feats.labels) < 1).all() and feats.task_names == TASKS
    idx = trained.buffer.per_task_indices(8, [0, 1, 2], seed=0)
    batch = trained.buffer.batch(idx)
    x = trained._inputs(batch["obs"], batch["task_ids"])
    torch.testing.assert_close(torch.as_tensor(feats.outputs), trained.actor.deterministic(x).detach(), rtol=1e-5, atol=1e-6)
    z = np.random.default_rng(0).normal(size=(1, 24))
    z *= 1e-3 / np.linalg.norm(back_project(proj, z)["net.0.weight"])
    params = next(policy_params_from_solutions(trained.actor, proj, z))
    moved = torch.tanh(torch.func.functional_call(trained.actor, params, (x,))[0]).detach().numpy()
    predicted = feats.outputs + np.einsum("nck,k->nc", feats.jacobians, z[0])
    change = predicted - feats.outputs
    assert np.abs(moved - predicted).max() < 0.05 * np.abs(change).max()


def test_the_policy_harvest_resolves_auto_like_the_harvest_runner(trained):
    d = sum(p.numel() for p in trained.actor.parameters())
    _, small = harvest_policy_features(trained, n_per_task=2, projection="auto", proj_dim=24, seed=0)
    assert small.kind == "sjlt"  # below the tensor sketch's measured size
    _, exact = harvest_policy_features(trained, n_per_task=2, projection="auto", proj_dim=d, seed=0)
    assert exact.kind == "identity" and exact.k == d

def test_attribution_report_has_one_row_per_environment(trained, tmp_path):
    cfg = RLAttributionConfig(n_per_task=32, proj_dim=16, n_subsets=10, subset_size=0, ensemble_samples=400,
                              top_k=1, max_episode_steps=10)
    est = PolicyGradEx(trained, cfg)
    report = attribute_policy(trained, cfg, estimator=est)
    assert report.task_names == TASKS and report.target_names == TASKS + ["all"]
    assert report.scores["ensemble"].shape == (3, 4) and report.losses.shape == (10, 4)
    # F is minus the mean return: the "all" column is the mean of the task columns
    np.testing.assert_allclose(report.losses[:, 3], report.losses[:, :3].mean(1))
    F0 = report.fit_quality["snapshot_loss"]
    ev = evaluate_policy(trained.actor, est.envs)
    assert F0["reach-v3"] == pytest.approx(-ev["reach-v3"]["return"])
    # same subsets, same estimates (seeded rollouts of a deterministic policy)
    F_again, _ = est.losses(report.subsets[:3])
    np.testing.assert_allclose(F_again, report.losses[:3, :3])
    for entry in report.best_subsets:
        assert len(entry["top_partners"]) == 1 and entry["top_partners"][0] != entry["target"]
    report.save(tmp_path / "report")
    from lightning_ksm import AttributionReport

    assert AttributionReport.load(tmp_path / "report") == report
    with pytest.raises(ValueError, match="source_tasks is empty"):
        PolicyGradEx(trained, cfg, source_tasks=[])
    with pytest.raises(ValueError, match="top_k=3 partners need at least"):
        PolicyGradEx(trained, RLAttributionConfig(top_k=3))
    assert report.fit_quality["gradex_targets"] == "critic" and report.fit_quality["linearization_error"] < 0.3
    with pytest.raises(ValueError, match="targets='policy' needs teacher="):
        PolicyGradEx(trained, RLAttributionConfig(targets="policy", top_k=1))
    with pytest.raises(ValueError, match=r"unknown RL attribution setting\(s\) \['lamda'\]"):
        attribute_policy(trained, {"lamda": 1.0})


def test_top_partners_excludes_the_target_and_ranks_by_score():
    scores = np.array([[5.0, 1.0], [0.5, 2.0], [3.0, -1.0]])
    out = top_partners(scores, ["a", "b", "c"], ["a", "all"], k=2)
    assert [p for p, _ in out["a"]] == ["c", "b"]
    assert [p for p, _ in out["all"]] == ["b", "a"]


# -- the recipe's --quick smoke run ----------------------------------------------------------------


def test_recipe_quick_runs_end_to_end(tmp_path):
    from dataclasses import replace

    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])  # recipes/ lives at the repository root
    if root not in sys.path:
        sys.path.insert(0, root)
    from recipes.mt10_sac import CONFIGS, run

    cfg = replace(CONFIGS["quick"], pretrain_steps=120, warmup_steps=40, finetune_steps=40, max_episode_steps=15)
    results = run(cfg, str(tmp_path / "quick"), str(tmp_path / "mt10.json"))
    assert len(results["evaluation_subsets"]) == 3 and np.shape(results["true_returns"]) == (3, 3)
    assert {"kernel", "linear", "gradex_direct", "critic_targets_kernel"} <= set(results["lds"])
    assert results["budget"]["phases"]["continued_run"]["env_steps"] == 40 * 3
    assert set(results["task_selection"]["per_target"]) == set(cfg.tasks)
    assert results["budget"]["phases"]["pretrain"]["env_steps"] == 120 * 3
    assert (tmp_path / "quick" / "report" / "report.json").exists() and (tmp_path / "mt10.json").exists()


def test_callback_snapshots_w0_and_attributes_it(run):
    import csv

    module, callback, trainer = run
    assert callback.w0["iterations"] == 100 and len(callback.w0["buffer"]["task_ids"]) == 300
    report = callback.report
    assert report.task_names == TASKS and report.target_names == TASKS + ["all"]
    assert os.path.exists(os.path.join(callback.report_dir, "report.json"))
    # the report is the attribution of W0 (not of the final weights): recompute it from the snapshot
    assert report.fit_quality["gradex_targets"] == "policy"  # toward the final policy's actions
    again = attribute_policy(SACModule.from_snapshot(callback.w0), CALLBACK_CONFIG, teacher=module)
    np.testing.assert_allclose(again.losses, report.losses)
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as fh:
        header = next(csv.reader(fh))
    assert "ksm/score/all/reach-v3" in header
    from lightning_ksm.rl import RLTaskAttribution

    with pytest.raises(ValueError, match="snapshot_at must be an integer >= 1"):
        RLTaskAttribution(snapshot_at=0)
