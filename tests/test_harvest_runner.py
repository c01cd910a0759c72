"""The harvest runner without a Trainer: loaders -> shards, DDP sharding by rank, one resume design."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ksm import HarvestConfig
from lightning_ksm.harvesting import HarvestRunner, harvest, projector_for_model
from lightning_ksm.store import FeatureStore


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.body(x)


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g),
                         torch.arange(n) % 4)


CONFIG = HarvestConfig(projection="sjlt", proj_dim=8, proj_draws=1, harvest_batch_size=3)


def _plan(train, val):
    return [("source", DataLoader(train, batch_size=5)), ("target", DataLoader(val, batch_size=5))]


def test_two_ranks_merge_to_the_single_process_harvest_and_resume_recomputes_nothing(tmp_path):
    torch.manual_seed(0)
    model = _MLP()
    train, val = _data(13, 1), _data(7, 2)
    proj = projector_for_model(model, "sjlt", 8)
    ref = harvest(model, [tuple(train.tensors)], projector=proj)

    calls = []

    def fwd(m, inputs):
        calls.append(1)
        return m(inputs)

    store = FeatureStore(tmp_path / "feats")
    for rank in (0, 1):  # rank r takes chunks c % 2 == r, into one store
        runner = HarvestRunner(model, store, config=CONFIG, forward_fn=fwd, rank=rank, world=2)
        if rank == 0:
            runner.initialize_store()
        runner.run(_plan(train, val))
        assert runner.shards_computed > 0 and runner.shards_skipped == 0
    loaded = store.load("source")
    np.testing.assert_allclose(loaded.outputs, ref.outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded.jacobians, ref.jacobians, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(loaded.task_ids, ref.task_ids)
    assert store.load("target").n_samples == 7

    # Resume: every chunk is stored, nothing is recomputed (the model is never called).
    calls.clear()
    again = HarvestRunner(model, store, config=CONFIG, forward_fn=fwd, rank=1, world=2)
    summary = again.run(_plan(train, val))
    assert summary == {"computed": 0, "skipped": again.shards_skipped} and again.shards_skipped > 0 and not calls

    # The data changed under a stored harvest: refused, naming the shard.
    with pytest.raises(ValueError, match="loader 'l0' of split 'source' now gives 14 samples.*the data or harvest_batch_size changed"):
        HarvestRunner(model, store, config=CONFIG, rank=0, world=2).run(_plan(_data(14, 1), val))
    # Another projection into the same store is refused by the store.
    other = HarvestRunner(model, store, config=HarvestConfig(projection="sjlt", proj_dim=16))
    with pytest.raises(ValueError, match="different k"):
        other.initialize_store()


def test_weights_are_w0_and_the_model_is_untouched(tmp_path):
    torch.manual_seed(0)
    model = _MLP()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained" weights; the harvest must still be at W0
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, val = _data(6, 1), _data(4, 2)
    runner = HarvestRunner(model, tmp_path / "f", config=CONFIG, weights=w0)
    runner.initialize_store()
    runner.run(_plan(train, val))
    at_w0 = _MLP()
    at_w0.load_state_dict(w0)
    ref = harvest(at_w0, [tuple(train.tensors)], projector=runner.projector)
    np.testing.assert_allclose(FeatureStore(tmp_path / "f").load("source").outputs, ref.outputs, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, after[n]) for n, p in model.named_parameters())


def test_probe_fails_on_bad_labels_before_any_harvest(tmp_path):
    model = _MLP()
    train = _data(6, 1)
    train.tensors[1][0] = 7  # 3 classes
    runner = HarvestRunner(model, tmp_path / "f", config=CONFIG)
    with pytest.raises(ValueError, match="label 7 is out of range for 3 classes"):
        runner.probe(_plan(train, _data(4, 2)))
    assert not FeatureStore(tmp_path / "f").exists()


@pytest.mark.parametrize("bad, name", [({"proj_dim": 0}, "proj_dim"), ({"projection": "fft"}, "projection"),
                                       ({"output": "softmax"}, "output"), ({"chunk_size": -1}, "chunk_size"),
                                       ({"jacobian_dtype": "int8"}, "jacobian_dtype")])
def test_bad_harvest_settings_name_the_setting(tmp_path, bad, name):
    with pytest.raises(ValueError, match=name):
        HarvestRunner(_MLP(), tmp_path / "f", config=bad)
    with pytest.raises(ValueError, match="rank must be in"):
        HarvestRunner(_MLP(), tmp_path / "f", rank=2, world=2)
