"""Tests for the harvest: closed-form Jacobians, output modes, chunking, selection, invariants, errors."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_ksm.harvesting import exact_gradients, harvest, projector_for_model, select_parameters
from lightning_ksm.harvesting.projection import make_projector


def _linear(n_in=3, n_out=4, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out).double()


def _data(n=10, n_in=3, n_classes=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=torch.float64)
    y = torch.randint(0, n_classes, (n,), generator=g)
    return x, y


def _closed_form_logit_jacobian(x):
    """d z_c / d(W, b) for z = W x + b: rows c, flat columns [W (C x n_in) row-major, b (C)]."""
    n_classes = 4
    eye = np.eye(n_classes)
    jw = np.einsum("ca,j->caj", eye, x).reshape(n_classes, -1)
    return np.concatenate([jw, eye], axis=1)  # (C, C*n_in + C)


def test_logits_jacobian_matches_closed_form_exactly():
    model = _linear()
    x, y = _data()
    ident = projector_for_model(model, "identity", None)
    feats = harvest(model, [(x, y, [0] * 10)], projector=ident, mode="logits")
    assert feats.mode == "logits" and feats.jacobians.shape == (10, 4, 16)
    np.testing.assert_allclose(feats.outputs, model(x).detach().numpy(), atol=1e-12)
    for i in range(10):
        np.testing.assert_allclose(feats.jacobians[i], _closed_form_logit_jacobian(x[i].numpy()), atol=1e-12)
    np.testing.assert_array_equal(feats.labels, y.numpy())


def test_margin_value_and_gradient_match_closed_form_under_a_projection():
    model = _linear()
    x, y = _data()
    proj = projector_for_model(model, "gaussian", 8, seed=2)
    feats = harvest(model, [(x, y, [0] * 10)], projector=proj, mode="margin")
    z = model(x).detach().numpy()
    expected_out, expected_grad = [], []
    for i in range(10):
        others = np.delete(np.arange(4), y[i])
        w = np.exp(z[i, others] - z[i, others].max())
        soft = np.zeros(4)
        soft[others] = w / w.sum()
        expected_out.append(z[i, y[i]] - (np.log(w.sum()) + z[i, others].max()))
        dm_dz = np.eye(4)[y[i]] - soft  # d margin / d logits
        expected_grad.append(dm_dz @ _closed_form_logit_jacobian(x[i].numpy()))
    np.testing.assert_allclose(feats.outputs, expected_out, atol=1e-12)
    np.testing.assert_allclose(feats.labels, np.ones(10))
    expected_proj = proj.project_flat(torch.tensor(np.array(expected_grad))).numpy()
    np.testing.assert_allclose(feats.jacobians, expected_proj, atol=1e-10)


def test_regression_logistic_and_custom_modes():
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x, _ = _data()
    yr = torch.linspace(-1, 1, 10, dtype=torch.float64)
    ident = projector_for_model(model, "identity", None)
    closed = np.concatenate([x.numpy(), np.ones((10, 1))], axis=1)  # d(w.x + b)/d(w, b)
    f = harvest(model, [(x, yr, [0] * 10)], projector=ident, mode="regression")
    np.testing.assert_allclose(f.outputs, model(x).detach().numpy().ravel(), atol=1e-12)
    np.testing.assert_allclose(f.jacobians, closed, atol=1e-12)
    np.testing.assert_allclose(f.labels, yr.numpy())
    yb = (yr > 0).long()
    f = harvest(model, [(x, yb, [0] * 10)], projector=ident, mode="logistic")
    np.testing.assert_allclose(f.jacobians, closed, atol=1e-12)
    np.testing.assert_array_equal(f.labels, yb.numpy())

    def squared(outputs, labels):  # per-sample (f - y)^2: gradient 2 (f - y) x
        return (outputs[:, 0] - labels) ** 2

    f = harvest(model, [(x, yr, [0] * 10)], projector=ident, mode=squared)
    resid = model(x).detach().numpy().ravel() - yr.numpy()
    assert f.mode == "custom"
    np.testing.assert_allclose(f.outputs, resid**2, atol=1e-12)
    np.testing.assert_allclose(f.jacobians, 2 * resid[:, None] * closed, atol=1e-12)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 6))

    def forward(self, x):
        return self.body(x)


def _mlp_data(n=13, seed=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 6, (n,), generator=g)


@pytest.mark.parametrize("mode", ["margin", "logits"])
def test_chunk_size_and_batching_do_not_change_results(mode):
    torch.manual_seed(0)
    model = _MLP()
    x, y = _mlp_data()
    proj = projector_for_model(model, "sjlt", 16, seed=1)
    tasks = [i % 3 for i in range(13)]
    ref = harvest(model, [(x, y, tasks)], projector=proj, mode=mode, chunk_size=64)
    # chunk 4 < C = 6 forces class blocks in logits mode; uneven batches split the data
    for chunk in (1, 4):
        batches = [(x[:5], y[:5], tasks[:5]), (x[5:], y[5:], tasks[5:])]
        other = harvest(model, batches, projector=proj, mode=mode, chunk_size=chunk)
        np.testing.assert_allclose(other.outputs, ref.outputs, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(other.jacobians, ref.jacobians, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(other.task_ids, ref.task_ids)
    # the projected Jacobian is the projection of the exact per-sample gradient
    _, exact = exact_gradients(model, x, y, mode=mode)
    np.testing.assert_allclose(ref.jacobians, proj.project_flat(torch.tensor(exact)).numpy(), rtol=1e-4, atol=1e-5)


def test_include_exclude_select_the_right_parameters():
    model = _MLP()
    assert select_parameters(model) == ["body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"]
    assert select_parameters(model, include="body.0.*") == ["body.0.weight", "body.0.bias"]
    assert select_parameters(model, exclude=["*.bias"]) == ["body.0.weight", "body.3.weight"]
    assert select_parameters(model, include="re:3\\.(weight|bias)$") == ["body.3.weight", "body.3.bias"]
    model.body[0].weight.requires_grad_(False)
    assert select_parameters(model) == ["body.0.bias", "body.3.weight", "body.3.bias"]
    assert select_parameters(model, params=["body.0.weight"]) == ["body.0.weight"]
    with pytest.raises(ValueError, match="no parameter selected"):
        select_parameters(model, include="encoder.*")
    with pytest.raises(ValueError, match="no parameter\\(s\\) \\['nope'\\]"):
        select_parameters(model, params=["nope"])
    # the harvested Jacobian for a selection is the matching columns of the full gradient
    x, y = _mlp_data()
    _, full = exact_gradients(model, x, y, params=["body.0.weight", "body.0.bias", "body.3.weight", "body.3.bias"])
    proj = projector_for_model(model, "identity", None, include="body.3.*")
    part = harvest(model, [(x, y, [0] * 13)], projector=proj, include="body.3.*")
    np.testing.assert_allclose(part.jacobians, full[:, 40 + 8:], rtol=1e-6, atol=1e-7)
    default = harvest(model, [(x, y, [0] * 13)], projector=proj)  # selection defaults to the projector's
    np.testing.assert_allclose(default.jacobians, part.jacobians)
    alien = make_projector("identity", {"body.9.weight": (2, 2)}, None)
    with pytest.raises(ValueError, match="no parameter\(s\) \['body.9.weight'\]"):
        harvest(model, [(x, y, [0] * 13)], projector=alien)


def test_model_state_and_rng_are_unchanged_and_eval_mode_is_used():
    torch.manual_seed(0)
    model = _MLP()
    model.train()
    model.body[2].eval()  # a mixed state must come back exactly
    model.body[0].bias.requires_grad_(False)
    model.body[3].weight.grad = torch.full_like(model.body[3].weight, 7.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    grad_obj = model.body[3].weight.grad
    x, y = _mlp_data()
    rng = torch.get_rng_state()
    proj = projector_for_model(model, "gaussian", 8)
    feats = harvest(model, [(x, y, [0] * 13)], projector=proj, mode="logits")
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.body[3].weight.grad is grad_obj and (grad_obj == 7.0).all()
    assert model.body[0].weight.grad is None
    # inside Lightning's validation (no_grad) or trainer.validate() (inference_mode) it still works
    with torch.inference_mode():
        xi = x.clone()
        under_inference = harvest(model, [(xi, y, [0] * 13)], projector=proj, mode="logits")
    with torch.no_grad():
        under_no_grad = harvest(model, [(x, y, [0] * 13)], projector=proj, mode="logits")
    np.testing.assert_allclose(under_inference.jacobians, feats.jacobians, rtol=1e-6)
    np.testing.assert_allclose(under_no_grad.jacobians, feats.jacobians, rtol=1e-6)
    model.eval()  # dropout active in train mode would make outputs random; the harvest used eval
    np.testing.assert_allclose(feats.outputs, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    model.train()
    with pytest.raises(ValueError):  # state is restored on errors too
        harvest(model, [(x, y + 100, [0] * 13)], projector=proj, mode="logits")
    assert [m.training for m in model.modules()] == [True, True, True, True, True, True]


def test_weights_override_evaluates_at_w0_without_touching_the_model():
    model, w0_model = _linear(seed=0), _linear(seed=5)
    w0 = {n: p.detach().clone() for n, p in w0_model.named_parameters()}
    current = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _data()
    proj = projector_for_model(model, "rademacher", 6, seed=3)
    at_w0 = harvest(model, [(x, y, [0] * 10)], projector=proj, weights=w0)
    ref = harvest(w0_model, [(x, y, [0] * 10)], projector=proj)
    np.testing.assert_allclose(at_w0.outputs, ref.outputs, atol=1e-12)
    np.testing.assert_allclose(at_w0.jacobians, ref.jacobians, atol=1e-12)
    for n, p in model.named_parameters():
        assert torch.equal(p, current[n])
    with pytest.raises(ValueError, match="weights\\['bias'\\] has shape"):
        harvest(model, [(x, y, [0] * 10)], projector=proj, weights={"bias": torch.zeros(3)})


def test_task_ids_pytree_inputs_forward_fn_and_sample_index():
    model = _linear()
    x, y = _data(n=6)
    proj = projector_for_model(model, "identity", None)

    def fwd(m, inputs):  # dict inputs, a custom call
        return m(inputs["a"] + inputs["b"])

    inputs = {"a": x, "b": torch.zeros_like(x)}
    tasks = ["cola", "sst2", "cola", "mnli", "sst2", "cola"]
    f = harvest(model, [(inputs, y, tasks)], projector=proj, forward_fn=fwd)
    assert f.task_names == ["cola", "mnli", "sst2"]
    np.testing.assert_array_equal(f.task_ids, [0, 2, 0, 1, 2, 0])
    g = harvest(model, [(x, y, tasks)], projector=proj, task_names=["sst2", "cola", "mnli"])
    np.testing.assert_array_equal(g.task_ids, [1, 0, 1, 2, 0, 1])
    np.testing.assert_allclose(g.jacobians, f.jacobians)
    with pytest.raises(ValueError, match="unknown task id 'mnli'"):
        harvest(model, [(x, y, tasks)], projector=proj, task_names=["sst2", "cola"])
    # duplicates by global index are dropped (first kept), rows ordered by index
    batches = [(x[:4], y[:4], tasks[:4], [5, 1, 3, 0]), (x[3:], y[3:], tasks[3:], [3, 2, 4])]
    d = harvest(model, batches, projector=proj)
    assert len(d.outputs) == 6
    order = [3, 1, 4, 2, 5, 0]  # positions in x of indices 0..5 (index 3 kept from the first batch)
    np.testing.assert_allclose(d.outputs, f.outputs[order])


class _Sqrt(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return torch.sqrt((x * self.w).sum(1))


def test_bad_input_errors_name_what_to_fix():
    model = _linear()
    x, y = _data()
    proj = projector_for_model(model, "gaussian", 4)
    ok = (x, y, [0] * 10)
    with pytest.raises(TypeError, match="batch 1 must be a tuple \\(inputs, labels, task_ids\\)"):
        harvest(model, [ok, (x, y)], projector=proj)
    with pytest.raises(TypeError, match="batch 0 must be a tuple"):
        harvest(model, [{"x": x}], projector=proj)
    bad_y = y.clone()
    bad_y[7] = 4
    with pytest.raises(ValueError, match="batch 0, sample 7: label 4 is out of range for 4 classes"):
        harvest(model, [(x, bad_y, [0] * 10)], projector=proj, mode="logits")
    with pytest.raises(ValueError, match="mode 'regression' needs one scalar output per sample"):
        harvest(model, [ok], projector=proj, mode="regression")
    scalar = nn.Linear(3, 1).double()
    with pytest.raises(ValueError, match="mode 'margin' needs C >= 2"):
        harvest(scalar, [ok], projector=projector_for_model(scalar, "gaussian", 4), mode="margin")
    with pytest.raises(ValueError, match="logistic labels must be 0 or 1"):
        harvest(scalar, [(x, y, [0] * 10)], projector=projector_for_model(scalar, "gaussian", 4), mode="logistic")
    with pytest.raises(ValueError, match="no parameter selected"):
        harvest(model, [ok], projector=proj, include="encoder.*")
    with pytest.raises(ValueError, match="other parameters than the selection"):
        harvest(model, [ok], projector=proj, include="weight")
    with pytest.raises(ValueError, match="mode must be one of"):
        harvest(model, [ok], projector=proj, mode="softmax")
    with pytest.raises(ValueError, match="9 task ids for 10 samples"):
        harvest(model, [(x, y, [0] * 9)], projector=proj)
    # non-finite output / gradient: the error names the sample (and the parameter)
    sq = _Sqrt()
    xs = torch.rand(5, 3) + 0.1
    xs[3] = 0.0  # sqrt'(0) = inf: finite output, non-finite gradient
    sproj = projector_for_model(sq, "gaussian", 4)
    with pytest.raises(ValueError, match="batch 0, sample 3: the gradient of parameter 'w' is not finite"):
        harvest(sq, [(xs, torch.zeros(5), [0] * 5)], projector=sproj, mode="regression")
    xs[3] = 1.0
    xs[2] = -5.0  # sqrt of a negative number: NaN output
    with pytest.raises(ValueError, match="sample 2: the model output is not finite"):
        harvest(sq, [(xs, torch.zeros(5), [0] * 5)], projector=sproj, mode="regression", chunk_size=2)
