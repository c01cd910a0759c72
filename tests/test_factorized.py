"""The factorized projection: the hook-based batched path equals the same linear map applied to
exact per-sample gradients, covers Linear (sequences), Conv2d, Embedding, LayerNorm, biases and tied
weights, falls back for other parameters, preserves inner products (JL), and is seeded by name."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ksm import HarvestConfig
from lightning_ksm.harvesting import HarvestRunner, harvest, make_projector, projector_for_model, projector_from_config
from lightning_ksm.harvesting.factorized import FactorizedProjector, covered_parameters
from lightning_ksm.harvesting.projection import IdentityProjector
from lightning_ksm.store import FeatureStore


class TinySeq(nn.Module):
    """Embedding (tied with the output layer) -> LayerNorm -> Linear over positions -> a free scale."""

    def __init__(self, vocab=11, dim=6, classes=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied, as in GPT-2
        self.out = nn.Linear(vocab, classes)
        self.scale = nn.Parameter(torch.tensor(1.3))  # not covered: the exact fallback

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.norm(self.emb(tokens))))  # (n, L, dim)
        return self.out(self.head(h).mean(1)) * self.scale


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _seq_batch(n=7, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 11, (n, L), generator=g)
    tokens[0, :2] = 0  # padding positions
    return tokens, torch.randint(0, 4, (n,), generator=g)


def _exact_then_project(model, inputs, labels, projector, mode):
    ident = IdentityProjector({n: projector.param_shapes[n] for n in projector.names})
    flat = harvest(model, [(inputs, labels, [0] * len(labels))], projector=ident, mode=mode).jacobians
    flat = torch.as_tensor(flat, dtype=torch.float64)
    lead = flat.shape[:-1]
    grads, offset = {}, 0
    for name, shape in projector.param_shapes.items():
        size = int(np.prod(shape))
        grads[name] = flat[..., offset: offset + size].reshape(*lead, *shape)
        offset += size
    return projector.project(grads).numpy()


@pytest.mark.parametrize("mode", ["margin", "logits"])
def test_sequence_model_with_tied_weights_and_a_fallback_matches_the_exact_path(mode):
    torch.manual_seed(0)
    model = TinySeq().double()
    tokens, labels = _seq_batch()
    proj = projector_for_model(model, "factorized", 9, seed=3)
    covered, fallback = covered_parameters(model, proj.names)
    assert fallback == ["scale"] and "emb.weight" in covered and len(covered["emb.weight"]) == 2  # tied: 2 uses
    with pytest.warns(UserWarning, match=r"\['scale'\].*exact per-sample path"):
        fast = harvest(model, [(tokens, labels, [0] * 7)], projector=proj, mode=mode, chunk_size=3).jacobians
    slow = _exact_then_project(model, tokens, labels, proj, mode)
    assert fast.shape == slow.shape and fast.shape[-1] == proj.k
    np.testing.assert_allclose(fast, slow, rtol=1e-8, atol=1e-10)


def test_conv_and_linear_match_the_exact_path_and_the_model_is_untouched():
    torch.manual_seed(1)
    model = TinyConv().double()
    model.bn.running_mean.normal_()  # non-trivial running statistics
    model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    proj = projector_for_model(model, "factorized", 16, seed=0)
    assert covered_parameters(model, proj.names)[1] == []
    fast = harvest(model, [(x, y, [0] * 6)], projector=proj, mode="margin").jacobians
    np.testing.assert_allclose(fast, _exact_then_project(model, x, y, proj, "margin"), rtol=1e-8, atol=1e-10)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert not any(m._forward_hooks for m in model.modules())  # hooks are removed after the harvest


def test_inner_products_are_preserved_within_the_jl_error():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 30)).double()
    x = torch.randn(24, 40, dtype=torch.float64)
    y = torch.randint(0, 30, (24,))
    exact = harvest(model, [(x, y, [0] * 24)], projector=IdentityProjector(dict(
        (n, p.shape) for n, p in model.named_parameters())), mode="margin").jacobians
    G = exact @ exact.T
    scale = np.sqrt(np.outer(np.diag(G), np.diag(G)))
    errors, ratios = [], []
    for seed in range(8):
        proj = projector_for_model(model, "factorized", 1024, seed=seed)  # 32 x 32 per weight matrix
        z = harvest(model, [(x, y, [0] * 24)], projector=proj, mode="margin").jacobians
        Gp = z @ z.T
        errors.append(np.abs(Gp - G) / scale)
        ratios.append(np.diag(Gp) / np.diag(G))
    # Unbiased: over seeds the squared norms average to the exact ones.
    assert np.abs(np.mean(ratios, axis=0) - 1).mean() < 0.15
    # A per-sample weight gradient of a Linear layer is rank one (delta a^T), so its projected squared
    # norm is a product of two k=32 JL estimates: relative std about sqrt(2/32 + 2/32) = 0.35, where
    # a dense projection with the same k = 1024 would give 0.04. docs/gradex.md states this cost.
    assert np.std(ratios, axis=0).mean() < 0.5
    assert np.mean(errors) < 0.15


def test_seeded_by_parameter_name_and_rebuilt_from_its_config():
    shapes = {"a.weight": (8, 20), "a.bias": (8,), "b.weight": (3, 5)}
    p = make_projector("factorized", shapes, 16, seed=5)
    assert p.k == 16 + 8 + 15  # 4 x 4 block, exact bias (8 <= 16), exact 3 x 5 (15 <= 16)
    q = projector_from_config(p.config())
    g = {n: torch.randn(2, *s, dtype=torch.float64) for n, s in shapes.items()}
    torch.testing.assert_close(p.project(g), q.project(g))
    sub = p.subset(["b.weight", "a.weight"])
    torch.testing.assert_close(sub.project_param("a.weight", g["a.weight"]), p.project_param("a.weight", g["a.weight"]))
    with pytest.raises(ValueError, match="budget"):
        FactorizedProjector(shapes, 0)


def test_the_runner_and_the_store_take_the_factorized_harvest(tmp_path):
    torch.manual_seed(3)
    model = TinyConv()
    data = TensorDataset(torch.randn(10, 2, 6, 6), torch.randint(0, 5, (10,)), torch.arange(10) % 3)
    runner = HarvestRunner(model, tmp_path / "f", config=HarvestConfig(projection="factorized", proj_dim=16,
                                                                        harvest_batch_size=4))
    runner.initialize_store()
    runner.run([("source", DataLoader(data, batch_size=4))])
    stored = FeatureStore(tmp_path / "f").load("source")
    direct = harvest(model, [(data.tensors[0], data.tensors[1], data.tensors[2].tolist())], projector=runner.projector)
    np.testing.assert_allclose(stored.jacobians, direct.jacobians, rtol=1e-5, atol=1e-6)


def tiny_gpt2_batch():
    """A 1-layer GPT-2 from transformers (Conv1D blocks, LayerNorms, tied wte / lm_head), in float64,
    read as a 4-way classifier at the last position, and a batch of 5: (model, forward_fn, tokens, labels)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=6,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double()

    def last_logits(m, tokens):
        return m(input_ids=tokens).logits[:, -1, :4]

    return model, last_logits, torch.randint(0, 13, (5, 6)), torch.randint(0, 4, (5,))


def test_a_gpt2_from_transformers_matches_the_exact_path():
    model, last_logits, tokens, labels = tiny_gpt2_batch()
    proj = projector_for_model(model, "factorized", 9, seed=1)
    covered, fallback = covered_parameters(model, proj.names)
    assert fallback == [] and len(covered["transformer.wte.weight"]) == 2
    fast = harvest(model, [(tokens, labels, [0] * 5)], projector=proj, forward_fn=last_logits).jacobians
    ident = IdentityProjector({n: proj.param_shapes[n] for n in proj.names})
    exact = harvest(model, [(tokens, labels, [0] * 5)], projector=ident, forward_fn=last_logits).jacobians
    grads, offset = {}, 0
    for name, shape in proj.param_shapes.items():
        size = int(np.prod(shape))
        grads[name] = torch.as_tensor(exact[:, offset: offset + size]).reshape(5, *shape)
        offset += size
    np.testing.assert_allclose(fast, proj.project(grads).numpy(), rtol=1e-7, atol=1e-9)


def test_the_same_projection_in_another_process():
    """Ranks and resumed runs rebuild the map from its config: it must not depend on the process."""
    import json
    import subprocess
    import sys

    shapes = {"enc.weight": (40, 30), "enc.bias": (40,), "head.weight": (5, 40)}
    code = (
        "import json, sys, torch\n"
        "from lightning_ksm.harvesting import make_projector\n"
        f"p = make_projector('factorized', {shapes!r}, 64, seed=7)\n"
        "g = {n: torch.ones(1, *s, dtype=torch.float64) for n, s in p.param_shapes.items()}\n"
        "print(json.dumps(p.project(g)[0].tolist()))\n"
    )
    here = make_projector("factorized", shapes, 64, seed=7)
    ones = {n: torch.ones(1, *s, dtype=torch.float64) for n, s in shapes.items()}
    torch.manual_seed(123)  # the global RNG state must not matter
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    np.testing.assert_array_equal(np.array(json.loads(out.stdout)), here.project(ones)[0].numpy())


class UsesAWeightOutsideItsModule(nn.Module):
    """A hand-tied output layer: the embedding's weight is also used directly in forward, where the
    layer hooks cannot see it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mix = nn.Linear(6, 6)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens))).mean(1)
        return h @ self.emb.weight[:4].T


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_parameter_used_outside_its_module_is_refused_by_name(dtype):
    torch.manual_seed(0)
    model = UsesAWeightOutsideItsModule().to(dtype)
    tokens, labels = _seq_batch()
    batch = [(tokens, labels, [0] * len(labels))]
    proj = projector_for_model(model, "factorized", 16, seed=0)
    with pytest.raises(ValueError, match=r"'emb\.weight' is used outside the module"):
        harvest(model, batch, projector=proj, mode="margin")
    # without it the others pass the same check (as every model of the tests above does)
    proj = projector_for_model(model, "factorized", 16, seed=0, exclude=["emb.weight"])
    fast = harvest(model, batch, projector=proj, mode="margin").jacobians
    assert np.isfinite(fast).all() and fast.shape == (len(labels), proj.k)


def test_batchnorm_uses_the_snapshot_statistics_not_the_live_ones():
    """The harvest at W0 after training: the live module's running statistics have moved on, and
    the hooks must use W0's (the ones the forward pass uses), as the exact path does."""
    torch.manual_seed(1)
    model = TinyConv().double()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    w0 = {n: t.detach().clone() for n, t in model.state_dict().items()}
    model.bn.running_mean.add_(1.0)  # "training" moved the live statistics
    model.bn.running_var.mul_(3.0)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    proj = projector_for_model(model, "factorized", 16, seed=0)
    fast = harvest(model, [(x, y, [0] * 6)], projector=proj, mode="margin", weights=w0).jacobians
    reference = TinyConv().double()
    reference.load_state_dict(w0)
    np.testing.assert_allclose(fast, _exact_then_project(reference, x, y, proj, "margin"), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("model_kind", ["seq", "conv"])
def test_preconditioned_factorized_matches_the_exact_path_and_is_rank_one_per_matrix(model_kind):
    torch.manual_seed(4)
    if model_kind == "seq":
        model = TinySeq().double()
        inputs, labels = _seq_batch()
        mode, k, warn = "margin", 9, True
    else:
        model = TinyConv().double()
        inputs, labels = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (6,))
        mode, k, warn = "margin", 16, False
    base = projector_for_model(model, "factorized", k, seed=1)
    scale = {n: 0.2 + torch.rand(s, dtype=torch.float64) for n, s in base.param_shapes.items()}
    proj = base.preconditioned(scale)
    if warn:
        with pytest.warns(UserWarning, match="exact per-sample path"):
            fast = harvest(model, [(inputs, labels, [0] * len(labels))], projector=proj, mode=mode).jacobians
    else:
        fast = harvest(model, [(inputs, labels, [0] * len(labels))], projector=proj, mode=mode).jacobians
    np.testing.assert_allclose(fast, _exact_then_project(model, inputs, labels, proj, mode), rtol=1e-8, atol=1e-10)
    # the map applied is the base projection of the scaled gradient: exact for vectors, and for a
    # matrix with the scale's rank-one approximation outer(row means, column means) / mean
    g = {n: torch.randn(1, *s, dtype=torch.float64) for n, s in base.param_shapes.items()}
    approx = {}
    for n, s in base.param_shapes.items():
        if base.plan[n][0] == "matrix":
            m = scale[n].reshape(base.plan[n][3], base.plan[n][4])
            approx[n] = (torch.outer(m.mean(1), m.mean(0)) / m.mean()).reshape(s)
        else:
            approx[n] = scale[n]
    want = base.project({n: g[n] * approx[n] for n in g})
    torch.testing.assert_close(proj.project(g), want, rtol=1e-10, atol=1e-12)
