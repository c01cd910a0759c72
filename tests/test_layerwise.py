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

from test_factorized import TinyConv, TinySeq, UsesAWeightOutsideItsModule, _seq_batch, tiny_gpt2_batch


def _both(model, batches, projector, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        vmap = harvest(model, batches, projector=projector, grad_engine="vmap", **kw)
        hooks = harvest(model, batches, projector=projector, grad_engine="hooks", **kw)
    return vmap, hooks


@pytest.mark.parametrize("kind,draws", [("sjlt", 1), ("sjlt", 2), ("gaussian", 1), ("rademacher", 2),
                                        ("tensorsketch", 1), ("tensorsketch", 2)])
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
    for kind in ("sjlt", "tensorsketch"):
        proj = preconditioned_projector(projector_for_model(model, kind, 48, seed=0, draws=2), scale)
        vmap, hooks = _both(model, [(x, y, [0] * 6)], proj, mode="margin")
        np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-9, atol=1e-12)
    proj = preconditioned_projector(projector_for_model(model, "sjlt", 48, seed=0, draws=2), scale)
    assert not np.allclose(hooks.jacobians, harvest(model, [(x, y, [0] * 6)], mode="margin",
                           projector=projector_for_model(model, "sjlt", 48, seed=0, draws=2)).jacobians)


class InPlaceAfterLayers(nn.Module):
    """torchvision's habits: ReLU(inplace=True) on a Linear's and a BatchNorm's output, and a
    residual added in place to a layer's output (BasicBlock's ``out += identity``)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b, self.c = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.relu(self.bn(self.a(x)))
        out = self.b(h)
        out += h
        return self.c(self.relu(out))


@pytest.mark.parametrize("kind", ["sjlt", "tensorsketch"])
def test_outputs_modified_in_place_after_a_layer_keep_their_gradients(kind):
    torch.manual_seed(2)
    model = InPlaceAfterLayers().double().eval()
    model.bn.running_mean.normal_()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    proj = projector_for_model(model, kind, 32, seed=1)
    vmap, hooks = _both(model, [(x, y, [0] * 8)], proj, mode="margin", chunk_size=4)
    np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-9, atol=1e-12)


def test_the_factorized_projection_takes_in_place_activations():
    torch.manual_seed(2)
    model = InPlaceAfterLayers().double().eval()
    x = torch.randn(8, 4, dtype=torch.float64)
    feats = harvest(model, [(x, torch.randint(0, 3, (8,)), [0] * 8)], mode="margin",
                    projector=projector_for_model(model, "factorized", 16, seed=1))  # raised HookCoverageError
    assert np.isfinite(feats.jacobians).all() and np.abs(feats.jacobians).sum() > 0


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
    model, last_logits, tokens, labels = tiny_gpt2_batch()
    for kind in ("sjlt", "tensorsketch"):
        proj = projector_for_model(model, kind, 64, seed=1, draws=2)
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


def test_the_tensor_sketch_of_an_outer_product_is_formed_from_its_sides():
    from lightning_ksm.harvesting.projection import make_projector, projector_from_config

    torch.manual_seed(0)
    P = make_projector("tensorsketch", {"w": (7, 5), "e": (11, 6)}, 16, seed=1)
    scale = {"w": torch.rand(7, 5, dtype=torch.float64) + 0.5, "e": torch.rand(11, 6, dtype=torch.float64) + 0.5}
    for Q in (P, P.with_scale(scale)):
        left, right = torch.randn(3, 4, 7, dtype=torch.float64), torch.randn(3, 4, 5, dtype=torch.float64)
        full = torch.einsum("nlr,nlc->nrc", left, right).reshape(3, -1)
        torch.testing.assert_close(Q.outer_part("w", left, right), Q.project_part("w", full))
        tokens, delta = torch.randint(0, 11, (3, 4)), torch.randn(3, 4, 6, dtype=torch.float64)
        grad = torch.zeros(3, 11, 6, dtype=torch.float64).scatter_add_(1, tokens.unsqueeze(-1).expand_as(delta), delta)
        torch.testing.assert_close(Q.embedding_part("e", tokens, delta), Q.project_part("e", grad.reshape(3, -1)))
    # the preconditioner of a matrix is applied as its rank-one approximation, and said so
    eff = P.with_scale(scale).effective_scale()["w"].double()
    sv = torch.linalg.svdvals(eff)
    assert sv[1] / sv[0] < 1e-5 and torch.allclose(eff.mean(), scale["w"].mean(), rtol=0.2)
    assert projector_from_config(P.config()) == P


def test_the_tensor_sketch_preserves_inner_products_like_an_sjlt_of_the_same_size():
    """Per-sample layer gradients are sums of a few outer products: on those, the structured hash
    must not cost accuracy against an SJLT (the Kronecker projection does: docs/gradex.md)."""
    from lightning_ksm.harvesting.projection import make_projector

    rows, cols, T, k = 96, 64, 3, 256
    errors = {"sjlt": [], "tensorsketch": []}
    for seed in range(30):
        g = torch.Generator().manual_seed(seed)
        a = [torch.randn(T, n, generator=g, dtype=torch.float64) for n in (rows, cols)]
        b = [x + 0.7 * torch.randn(x.shape, generator=g, dtype=torch.float64) for x in a]
        G1, G2 = a[0].T @ a[1], b[0].T @ b[1]
        exact = float((G1 * G2).sum())
        for kind in errors:
            p = make_projector(kind, {"w": (rows, cols)}, k, seed=seed).project({"w": torch.stack([G1, G2])})
            errors[kind].append((float(p[0] @ p[1]) - exact) / float(G1.norm() * G2.norm()))
    rms = {kind: float(np.sqrt(np.mean(np.square(e)))) for kind, e in errors.items()}
    assert rms["tensorsketch"] < 1.5 * rms["sjlt"] and rms["tensorsketch"] < 3 / np.sqrt(k), rms
    assert abs(np.mean(errors["tensorsketch"])) < 3 * rms["tensorsketch"] / np.sqrt(30)  # unbiased


def test_a_tensor_sketch_size_that_does_not_split_into_its_bands_is_refused():
    from lightning_ksm.harvesting.projection import make_projector

    with pytest.raises(ValueError, match=r"multiple of s=4, got k=10"):
        make_projector("tensorsketch", {"w": (3, 4)}, 10, seed=0)
    with pytest.raises(ValueError, match="s \\(bands\\)"):
        make_projector("tensorsketch", {"w": (3, 4)}, 8, seed=0, s=0)


def test_auto_picks_the_tensor_sketch_where_the_hooks_form_most_weights_from_both_sides():
    from lightning_ksm.harvesting.params import resolve_projection

    def pick(model, **kw):
        names = [n for n, _ in model.named_parameters()]
        return resolve_projection(model, names, HarvestConfig(**{"proj_dim": 1024, "proj_draws": 1, **kw}))

    seq = nn.Sequential(nn.Embedding(64, 48), nn.Linear(48, 64), nn.Linear(64, 3))  # d > 1024
    assert HarvestConfig().projection == "auto"
    assert pick(seq) == "tensorsketch"
    assert pick(seq, grad_engine="vmap") == "sjlt"  # the reference path keeps the plain sketch
    assert pick(seq, proj_dim=512) == "sjlt"  # narrower than where the tensor sketch was measured
    assert pick(seq, proj_dim=1026) == "sjlt"  # does not split into the sketch's 4 bands
    convs = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.Flatten(), nn.Linear(128, 2))
    assert pick(convs) == "factorized"  # convolution-heavy (docs/gradex.md: the pre-registered test)
    assert pick(convs, grad_engine="vmap") == "sjlt"
    depthwise = nn.Sequential(nn.Conv2d(32, 32, 3, groups=32), nn.Conv2d(32, 32, 3, groups=32), nn.Linear(4, 2))
    assert pick(depthwise, proj_dim=16) == "sjlt"  # grouped convolutions: the hooks do not cover them
    for kind in ("sjlt", "gaussian", "tensorsketch", "factorized"):
        assert pick(seq, projection=kind) == kind  # an explicit choice is kept
    d = sum(p.numel() for p in seq.parameters())
    for kind in ("auto", "sjlt", "tensorsketch"):  # the exact gradients are no larger than the sketch
        assert pick(seq, projection=kind, proj_dim=d) == "identity"
    assert pick(seq, projection="factorized", proj_dim=d) == "factorized"  # its k is a per-parameter budget
    assert pick(seq, proj_draws=2) == "tensorsketch"


def test_the_runner_records_the_projection_auto_resolved_to(tmp_path):
    from lightning_ksm.harvesting.runner import HarvestRunner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 48), nn.Linear(48, 64), nn.Linear(64, 3))
    runner = HarvestRunner(model, str(tmp_path / "store"))
    assert runner.projector.kind == "tensorsketch" and runner.projector.config()["kind"] == "tensorsketch"


def test_the_tensor_sketch_of_a_full_gradient_never_forms_a_rows_by_rows_matrix(monkeypatch):
    """An embedding's gradient as a matrix has a row per token: the sketch of a full gradient (the hook
    check, the per-sample path) used to sketch ``eye(rows)`` first, 40 GB for GPT-2's 50,257 tokens.
    Rows now go in blocks; any block size gives the same sketch as the two-sided formula."""
    from lightning_ksm.harvesting.projection import make_projector

    torch.manual_seed(0)
    P = make_projector("tensorsketch", {"e": (11, 6)}, 16, seed=1)
    tokens, delta = torch.randint(0, 11, (3, 4)), torch.randn(3, 4, 6, dtype=torch.float64)
    grad = torch.zeros(3, 11, 6, dtype=torch.float64).scatter_add_(1, tokens.unsqueeze(-1).expand_as(delta), delta)
    want = P.embedding_part("e", tokens, delta)
    for rows_per_block in (1, 4, 11):  # several blocks, a ragged last one, one block
        monkeypatch.setattr(P, "row_block_elements", rows_per_block * 3 * 16)
        torch.testing.assert_close(P.project_part("e", grad.reshape(3, -1)), want)
    # 400,000 rows: eye(rows) alone would be 640 GB
    big = make_projector("tensorsketch", {"e": (400_000, 2)}, 8, seed=0)
    g = torch.zeros(1, 400_000, 2)
    g[0, 123_456] = torch.tensor([1.0, -2.0])
    out = big.project_part("e", g.reshape(1, -1))
    assert out.shape == (1, 8) and torch.isfinite(out).all() and float(out.norm()) > 0


def test_gpt2_with_the_real_vocabulary_and_a_near_zero_gradient_harvests_through_the_hooks(tmp_path):
    """GPT2ForSequenceClassification from a config with the real 50,257-token vocabulary: the harvest
    died at its first batch (the sum check sketched eye(50,257)), and with any vocabulary the sum check
    refused the final LayerNorm's bias, whose summed gradient is ~1e-8 of the chunk's (float32 rounding,
    not a hook it cannot see), then fell back to vmap, which transformers' pad-token check breaks."""
    transformers = pytest.importorskip("transformers")
    import lightning.pytorch as L
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_ksm import TaskAttribution

    torch.manual_seed(0)
    vocab = 50_257
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab, n_positions=8, num_labels=2,
                                  pad_token_id=0)

    class Clf(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = transformers.GPT2ForSequenceClassification(cfg)

        def forward(self, x):
            return self.net(input_ids=x).logits

        def training_step(self, batch, _):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def validation_step(self, batch, _):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(1, vocab, (32, 8), generator=g), torch.randint(0, 2, (32,), generator=g)
    cb = TaskAttribution(n_subsets=10, progress=False, raise_on_analysis_error=True, dirpath=str(tmp_path / "ksm"))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Clf(), DataLoader(TensorDataset(x, y, torch.arange(32) % 4), batch_size=16),
                    DataLoader(TensorDataset(x[:8], y[:8], torch.zeros(8, dtype=torch.long)), batch_size=8))
    assert cb.report.config["harvest"]["projector"]["kind"] == "tensorsketch"
    assert len(cb.report.ranked("all")) == 4


def test_a_layer_whose_output_the_loss_does_not_use_gets_a_zero_share_once():
    """The hooks take each layer's share as its output gradient arrives in the backward pass; a layer
    called twice with one call unused (no gradient arrives for it) and a tied weight still give
    exactly the per-sample path's features."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            self.b(h * 2)  # a call of b whose output nothing uses
            return self.head(torch.tanh(self.b(h)))

    torch.manual_seed(0)
    model = Branchy().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for kind in ("sjlt", "tensorsketch"):
        proj = projector_for_model(model, kind, 16, seed=0)
        vmap, hooks = _both(model, [(x, y, [0] * 5)], proj, mode="margin")
        np.testing.assert_allclose(hooks.jacobians, vmap.jacobians, rtol=1e-9, atol=1e-12)
