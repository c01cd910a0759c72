"""output="sequence" and Hugging Face conventions (issue #24): a tiny GPT2LMHeadModel from a config
on HF-style dict batches (input_ids, attention_mask, labels with -100 on prompt and padding, task),
padded per batch, through the callback at default settings plus output="sequence"."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import lightning.pytorch as L  # noqa: E402

from lightning_ksm import TaskAttribution  # noqa: E402
from lightning_ksm.harvesting.batches import BatchReader  # noqa: E402
from lightning_ksm.harvesting.harvest import harvest  # noqa: E402
from lightning_ksm.harvesting.params import projector_for_model  # noqa: E402
from lightning_ksm.store import FeatureStore  # noqa: E402

from lm_problem import LitLM, answer_loss, loader, pretrain, samples, source_data, tiny_gpt2  # noqa: E402

TASKS = ["a", "b", "c", "noise"]


def _softplus(x):
    return np.logaddexp(0.0, -np.asarray(x, dtype=np.float64))  # log(1 + exp(-m)): the margin's loss


def _per_sample_loss(model, batches):
    with torch.no_grad():
        return np.concatenate([answer_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                           b["labels"]).double().numpy() for b in batches])


@pytest.mark.parametrize("projection", ["identity", "sjlt"])
def test_the_harvested_loss_is_each_samples_mean_answer_token_loss(projection):
    # batches padded per batch to different lengths; the model called with input_ids= and
    # attention_mask= as keywords, its ModelOutput read at .logits
    model = pretrain(tiny_gpt2(), steps=30)
    batches = list(loader(source_data(6), batch_size=5))
    assert len({b["input_ids"].shape[1] for b in batches}) > 1  # ragged T across batches
    reader = BatchReader(task_key="task")
    proj = projector_for_model(model, projection, None if projection == "identity" else 64)
    feats = harvest(model, [reader.read(b) for b in batches], projector=proj, mode="sequence")
    assert feats.outputs.shape == (24,) and feats.mode == "sequence"
    # GradEx's loss of the harvested output (logistic, label 1) is the loss the user trains, per sample
    np.testing.assert_allclose(_softplus(feats.outputs), _per_sample_loss(model, batches), rtol=1e-4, atol=1e-6)
    if projection == "identity":  # and its gradient is that loss's gradient
        first = batches[0]
        model.zero_grad()
        answer_loss(model(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits,
                    first["labels"])[0].backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
        got = -feats.jacobians[0] / (1.0 + np.exp(feats.outputs[0]))
        np.testing.assert_allclose(got, grad, atol=1e-5 * np.abs(grad).max())


def _fit(tmp_path, train, val, *, module=None, epochs=3, **kw):
    L.seed_everything(0, verbose=False)
    module = module or LitLM(pretrain(tiny_gpt2(), steps=150))
    cb = TaskAttribution(task_key="task", n_subsets=40, progress=False, raise_on_analysis_error=True,
                         dirpath=str(tmp_path / "ksm"), **kw)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[cb],
                        num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(train, batch_size=8, shuffle=True), loader(val, batch_size=16))
    return cb, module


def test_the_callback_fine_tunes_a_causal_lm_on_its_training_loss_and_reports_every_task(tmp_path):
    train, val = source_data(24), samples("a", 32, seed=50)
    cb, module = _fit(tmp_path, train, val, output="sequence")
    report = cb.report
    assert report.task_names == TASKS and report.config["callback"]["output"] == "sequence"
    # the harvest's per-sample loss is the training loss at W0, sample by sample (closed form)
    store = FeatureStore(cb.harvest_dir)
    feats = store.load("source")
    w0 = tiny_gpt2()
    w0.load_state_dict({k[len("model."):]: v for k, v in torch.load(cb.w0_path).items() if k.startswith("model.")},
                       strict=False)
    by_task = {t: [s for s in train if s["task"] == t] for t in TASKS}
    for k, t in enumerate(feats.task_names):
        expected = _per_sample_loss(w0, loader(by_task[t], 8))
        np.testing.assert_allclose(np.sort(_softplus(feats.outputs[feats.task_ids == k])), np.sort(expected),
                                   rtol=1e-4, atol=1e-6)
    # the run record's final losses are the real answer loss of the trained model (effect calibration)
    final = report.config["run"]["final_losses"]
    assert final["all"] == pytest.approx(float(_per_sample_loss(module.model, loader(val, 16)).mean()), rel=1e-4)
    # Every source task is scored. Its rank is not asserted: on this tiny problem real leave-one-out
    # retraining does not rank the random-answer task last either (any answer data lowered the target
    # loss), and the report's order moved with the projection draw's seed. The ranking claim belongs to
    # a recipe checked against real retraining (issue 24, item 4).
    scores = dict(report.ranked("all"))
    assert set(scores) == set(TASKS) and all(np.isfinite(v) for v in scores.values())


class _Counting(LitLM):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def _no_label(data, i):
    data[i] = {**data[i], "labels": torch.full_like(data[i]["labels"], -100)}
    return data


@pytest.mark.parametrize("case, kw, message", [
    ("3-D logits, default output", {}, "output='sequence'"),
    ("token id beyond the vocabulary", {"output": "sequence"}, "out of range for the model's 16 vocabulary"),
    ("a sample without supervised tokens", {"output": "sequence"}, "dataset index 5: no supervised token"),
    ("labels key missing", {"output": "sequence", "label_key": "answer_labels"}, "label_key='answer_labels'"),
])
def test_mismatches_fail_before_the_first_step_naming_the_key(tmp_path, case, kw, message):
    train = source_data(6)
    if case.startswith("token id"):
        train[17] = {**train[17], "labels": train[17]["labels"].masked_fill(train[17]["labels"] != -100, 40)}
    if case.startswith("a sample"):
        train = _no_label(train, 5)
    _Counting.steps = 0
    with pytest.raises(ValueError, match=message):
        _fit(tmp_path, train, samples("a", 8, seed=50), module=_Counting(tiny_gpt2()), epochs=1, **kw)
    assert _Counting.steps == 0
