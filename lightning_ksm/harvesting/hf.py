"""Hugging Face conventions: which keys of a dict batch are the model's inputs, how the model is
called with them (as keywords) and where its logits are (``.logits`` of a ``ModelOutput`` or dict).

A dict batch with ``input_ids`` (the tokenizers' and ``DataCollator``s' layout) gives the model the
keys of :data:`MODEL_INPUTS` it holds, and the model is called ``model(input_ids=..., attention_mask=...)``;
every other batch keeps the plain ``model(inputs)`` call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MODEL_INPUTS", "model_inputs", "is_model_kwargs", "call_model", "logits_of"]

# what a transformers model takes as keywords from a tokenized batch ("labels" is left out: the
# model would compute its own batch loss, which the harvest does not use)
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds",
                "decoder_input_ids", "decoder_attention_mask", "pixel_values")


def model_inputs(batch: Mapping) -> dict:
    """The model-input keys of an HF-style dict batch, in the batch's order."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def is_model_kwargs(inputs: Any) -> bool:
    """True for a dict whose keys are all HF model inputs and include ``input_ids`` or ``inputs_embeds``:
    such inputs are passed as keywords."""
    return (isinstance(inputs, Mapping) and bool(inputs) and all(k in MODEL_INPUTS for k in inputs)
            and ("input_ids" in inputs or "inputs_embeds" in inputs))


def logits_of(out: Any) -> Any:
    """A model output's tensor: ``.logits`` of a ``ModelOutput`` (or a dict's ``"logits"``), else as is."""
    if isinstance(out, Mapping) and "logits" in out:  # ModelOutput is an OrderedDict too
        return out["logits"]
    logits = getattr(out, "logits", None)
    return out if logits is None else logits


def call_model(model, inputs, forward_fn=None):
    """``forward_fn(model, inputs)`` when given; else ``model(**inputs)`` for HF model inputs and
    ``model(inputs)`` otherwise; the logits of what comes back (:func:`logits_of`)."""
    if forward_fn is not None:
        out = forward_fn(model, inputs)
    elif is_model_kwargs(inputs):
        out = model(**inputs)
    else:
        out = model(inputs)
    return logits_of(out)
