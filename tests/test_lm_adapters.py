"""Language-model fine-tuning as a first-class use (issue #24, item 3): LoRA adapters (peft) on a causal
LM and on a classifier, a head-only fine-tune, bf16 precision, a torch.compile'd module and SDPA
attention with the exact readout, each through ``TaskAttribution`` at its default settings on a tiny
GPT-2 from a config (vocabulary 16, one layer, width 16)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lightning.pytorch as L  # noqa: E402

from lightning_ksm import TaskAttribution  # noqa: E402
from lightning_ksm.harvesting.batches import BatchReader  # noqa: E402
from lightning_ksm.harvesting.harvest import harvest  # noqa: E402
from lightning_ksm.harvesting.params import projector_for_model  # noqa: E402
from lightning_ksm.store import FeatureStore  # noqa: E402

from lm_problem import VOCAB, LitLM, answer_loss, collate, loader, pretrain, samples, source_data, tiny_gpt2  # noqa: E402

TASKS = ["a", "b", "c", "noise"]


def _fit(tmp_path, module, *, classify=False, trainer_kw=None, **kw):
    L.seed_everything(0, verbose=False)
    train, val = source_data(8), samples("a", 16, seed=50)
    make = _class_loader if classify else loader
    cb = TaskAttribution(task_key="task", n_subsets=20, progress=False, raise_on_analysis_error=True,
                         dirpath=str(tmp_path / "ksm"), **kw)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path, callbacks=[cb],
                        num_sanity_val_steps=0, **(trainer_kw or {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, make(train, batch_size=8, shuffle=True), make(val, batch_size=16))
    return cb, [str(w.message) for w in caught]


def _check_report(cb, names=None):
    """A complete report over every task, with finite scores; the harvest covers exactly ``names``."""
    report = cb.report
    assert report is not None and report.task_names == TASKS
    scores = dict(report.ranked("all"))
    assert set(scores) == set(TASKS) and all(np.isfinite(v) for v in scores.values())
    store = FeatureStore(cb.harvest_dir)
    feats = store.load("source")
    assert feats.jacobians.shape[0] == 32 and np.isfinite(feats.jacobians).all()
    assert feats.readout is not None and np.isfinite(feats.readout).all()  # the exact readout is on
    if names is not None:
        assert sorted(n for n, _ in store.manifest()["params"]) == sorted(names)
    return store, feats


def _lora(model, **kw):
    peft = pytest.importorskip("peft")
    # GPT-2's attention projection is transformers' Conv1D (weight stored in x out)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, **kw)
    return peft.get_peft_model(model, config)


# -- a classifier: GPT2ForSequenceClassification on the same prompts --------------------------------
def _class_collate(items):
    batch = collate(items)
    batch["y"] = torch.tensor([int(i["input_ids"][0] > VOCAB // 2) for i in items])  # is the first symbol large?
    return batch


def _class_loader(data, batch_size=8, shuffle=False):
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=_class_collate)


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                                  bos_token_id=None, eos_token_id=None)
    return transformers.GPT2ForSequenceClassification(cfg)


class LitClassifier(L.LightningModule):
    def __init__(self, model, lr=1e-2):
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, **inputs):
        return self.model(**inputs).logits

    def _loss(self, batch):
        return nn.functional.cross_entropy(self(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]),
                                           batch["y"])

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


# -- the cases ---------------------------------------------------------------------------------------
def _sdpa(model):
    """The attention transformers' models get by default (``from_pretrained``): SDPA."""
    model.config._attn_implementation = "sdpa"
    return model


def test_lora_on_a_causal_lm_harvests_the_adapters_exactly(tmp_path):
    module = LitLM(_lora(_sdpa(pretrain(tiny_gpt2(), steps=30))))
    lora = [n for n, p in module.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    cb, _ = _fit(tmp_path, module, output="sequence")
    store, _ = _check_report(cb, lora)
    assert store.manifest()["projector"]["kind"] == "identity"  # few parameters: exact gradients
    # exact: a sample's harvested gradient is the gradient of its answer loss (the layer hooks cover
    # peft's lora_A / lora_B, which are nn.Linear)
    batch = collate(source_data(1))
    reader = BatchReader(task_key="task")
    feats = harvest(module, [reader.read(batch)], projector=projector_for_model(module, "identity", None, params=lora),
                    params=lora, mode="sequence")
    module.zero_grad()
    answer_loss(module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["labels"])[1].backward()
    grad = torch.cat([p.grad.reshape(-1) for n, p in module.named_parameters() if n in lora]).numpy()
    got = -feats.jacobians[1] / (1.0 + np.exp(feats.outputs[1]))  # d loss / d margin, chained
    np.testing.assert_allclose(got, grad, atol=1e-4 * np.abs(grad).max())


def test_lora_on_a_gpt2_classifier(tmp_path):
    module = LitClassifier(_lora(tiny_classifier(), modules_to_save=["score"]))
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    cb, _ = _fit(tmp_path, module, classify=True)
    _check_report(cb, trainable)


def test_a_head_only_fine_tune_of_a_gpt2_classifier(tmp_path):
    model = tiny_classifier()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("score."))
    cb, _ = _fit(tmp_path, LitClassifier(model), classify=True)
    _check_report(cb, ["model.score.weight"])


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precision(tmp_path, precision):
    cb, _ = _fit(tmp_path, LitLM(pretrain(tiny_gpt2(), steps=30)), output="sequence",
                 trainer_kw={"precision": precision})
    _check_report(cb)


@pytest.mark.parametrize("compiled", ["lightning module", "inner model"])
def test_a_compiled_module(tmp_path, compiled):
    # aot_eager: AOTAutograd as the default backend runs it (its donated buffers refused the harvest's
    # retained graph), without inductor's minutes of C++ compilation on a CPU
    model = pretrain(tiny_gpt2(), steps=30)
    if compiled == "inner model":
        module = LitLM(torch.compile(model, backend="aot_eager"))
    else:
        module = torch.compile(LitLM(model), backend="aot_eager")
    cb, _ = _fit(tmp_path, module, output="sequence")
    _check_report(cb)


def test_sdpa_attention_keeps_the_exact_readout(tmp_path):
    model = _sdpa(pretrain(tiny_gpt2(), steps=30))
    cb, messages = _fit(tmp_path, LitLM(model), output="sequence")
    assert not [m for m in messages if "exact readout off" in m]
    _check_report(cb)


class _Counting(LitLM):
    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def test_where_only_vmap_is_left_the_refusal_comes_before_the_first_step_and_names_the_fix(tmp_path):
    # grad_engine="vmap" runs the model per sample under torch.func.vmap, which transformers' SDPA mask
    # code refuses: a clear error at train start instead of vmap's own message
    _Counting.steps = 0
    with pytest.raises(ValueError, match=r"vmap.*exclude=.*attn_implementation='eager'"):
        _fit(tmp_path, _Counting(_sdpa(tiny_gpt2())), output="sequence", grad_engine="vmap")
    assert _Counting.steps == 0
