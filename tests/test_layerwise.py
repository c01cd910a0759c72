"""The default layer-hook harvest (grad_engine="hooks"): the same features as the per-sample vmap
path for every per-sample projection (SJLT, Gaussian, draws, preconditioned), on sequences with tied
weights, convolutions with BatchNorm, GPT-2 from transformers and logits mode; parameters its hooks
cannot see fall back to the per-sample path instead of being silently wrong."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ksm import HarvestConfig
from lightning_ksm.harvesting import Harvester, harvest, projector_for_model
from lightning_ksm.harvesting.engine import Engine
from lightning_ksm.harvesting.layerwise import LayerwiseEngine
from lightning_ksm.harvesting.projection import SJLTProjector
from lightning_ksm.harvesting.readout import preconditioned_projector

from test_factorized import TinyConv, TinySeq, UsesAWeightOutsideItsModule, _seq_batch


def _both(model, batches, projector, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        vmap = harvest(model, batches, projector=projector, grad_engine="vmap", **kw)
        hooks = harvest(model, batches, projector=projector, grad_engine="hooks", **kw)
    return vmap, hooks


@pytest.mark.parametrize("kind,draws", [("sjlt", 1), ("sjlt", 2), ("gaussian", 1), ("rademacher", 2)])
@pytest.mark.parametrize("mode", ["margin", "logits"])
def test_sequence_model_with_tied_weights_equals_the_per_sample_path(kind, draws, mode):
    torch.manual_seed(0)
    model = TinySeq().double()
    tokens, labels = _seq_batch()
    proj = projector_for_model(model, kind, 32, seed=3, draws=draws)
    vmap, hooks = _both(model, [(tokens, labels, [0] * 7)], proj, mode=mode, chunk_size=3)
    assert hooks.jacobians.shape == vmap.jacobians.shape
    np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(hooks.outputs, vmap.outputs, rtol=1e-12)


def test_conv_batchnorm_and_the_preconditioner_equal_the_per_sample_path():
    torch.manual_seed(1)
    model = TinyConv().double()
    model.bn.running_mean.normal_()
    model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    scale = {n: torch.rand_like(p) + 0.5 for n, p in model.named_parameters()}
    proj = preconditioned_projector(projector_for_model(model, "sjlt", 48, seed=0, draws=2), scale)
    vmap, hooks = _both(model, [(x, y, [0] * 6)], proj, mode="margin")
    np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-9, atol=1e-12)
    assert not np.allclose(hooks.jacobians, harvest(model, [(x, y, [0] * 6)], mode="margin",
                           projector=projector_for_model(model, "sjlt", 48, seed=0, draws=2)).jacobians)


def test_large_layers_are_projected_in_groups_of_samples(monkeypatch):
    """The per-sample gradients of one layer are formed a few samples at a time (MAX_ENTRIES)."""
    import lightning_ksm.harvesting.layerwise as lw

    torch.manual_seed(2)
    model = TinySeq().double()
    tokens, labels = _seq_batch(n=9)
    proj = projector_for_model(model, "sjlt", 16, seed=1)
    vmap, _ = _both(model, [(tokens, labels, [0] * 9)], proj, mode="margin")
    monkeypatch.setattr(lw, "MAX_ENTRIES", 40)  # smaller than one sample's embedding gradient
    _, hooks = _both(model, [(tokens, labels, [0] * 9)], proj, mode="margin")
    np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-9, atol=1e-12)


def test_gpt2_from_transformers_equals_the_per_sample_path():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=13, n_positions=6,
                                  bos_token_id=0, eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double()

    def last_logits(m, tokens):
        return m(input_ids=tokens).logits[:, -1, :4]

    tokens = torch.randint(0, 13, (5, 6))
    labels = torch.randint(0, 4, (5,))
    proj = projector_for_model(model, "sjlt", 64, seed=1, draws=2)
    vmap, hooks = _both(model, [(tokens, labels, [0] * 5)], proj, forward_fn=last_logits, mode="margin")
    np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-8, atol=1e-11)


def test_the_engine_is_chosen_by_the_setting():
    model = TinySeq()
    proj = projector_for_model(model, "sjlt", 16, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert isinstance(Harvester(model, projector=proj).engine, LayerwiseEngine)  # the default
        assert type(Harvester(model, projector=proj, grad_engine="vmap").engine) is Engine
    assert HarvestConfig().grad_engine == "hooks"
    with pytest.raises(ValueError, match="grad_engine"):
        Harvester(model, projector=proj, grad_engine="fast")
    with pytest.raises(ValueError, match="grad_engine"):
        HarvestConfig(grad_engine="fast").validate()
    # a model without any covered layer: the per-sample engine, without a warning per parameter
    bare = nn.Module()
    bare.w = nn.Parameter(torch.ones(3))
    bare.forward = lambda x: x * bare.w
    assert type(Harvester(bare, projector=projector_for_model(bare, "sjlt", 4, seed=0)).engine) is Engine


def test_a_parameter_used_outside_its_module_falls_back_and_the_features_stay_right():
    torch.manual_seed(0)
    model = UsesAWeightOutsideItsModule().double()
    tokens, labels = _seq_batch()
    batch = [(tokens, labels, [0] * len(labels))]
    proj = projector_for_model(model, "sjlt", 24, seed=0)
    vmap = harvest(model, batch, projector=proj, mode="margin", grad_engine="vmap")
    with pytest.warns(UserWarning, match=r"'emb\.weight' is used outside.*per-sample path instead"):
        hooks = harvest(model, batch, projector=proj, mode="margin", grad_engine="hooks")
    np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-9, atol=1e-12)


def test_shares_of_the_parameters_add_up_to_the_projection():
    shapes = {"a.weight": (5, 7), "a.bias": (5,), "b.weight": (3, 5)}
    proj = SJLTProjector(shapes, 16, seed=2)
    g = {n: torch.randn(4, *s, dtype=torch.float64) for n, s in shapes.items()}
    total = sum(proj.project_part(n, g[n].reshape(4, -1)) for n in shapes)
    torch.testing.assert_close(total, proj.project(g))
    sub = proj.subset(["b.weight"])
    torch.testing.assert_close(sub.project({"b.weight": g["b.weight"]}), proj.project_part("b.weight", g["b.weight"].reshape(4, -1)))
