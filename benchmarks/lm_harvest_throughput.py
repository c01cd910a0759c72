"""The harvest of a causal language model against its training, in one process, one torch thread
(issue: language-model fine-tuning as a first-class use, item 5: the harvest at >= 0.5x a plain
training step's throughput at the same batch size, exact readout on).

Model: ``transformers.GPT2LMHeadModel`` from a config (2 layers, width 128, a 2,048-token
vocabulary, random init), Hugging Face dict batches (``input_ids``, ``attention_mask``, ``labels``
with -100 on the prompt), ``output="sequence"`` (the per-sample mean answer-token loss).

- ``train``: AdamW steps (forward, backward, optimizer step) over the source batches: one epoch;
- ``harvest``: ``HarvestRunner`` at the callback's defaults (``projection="auto"``: the tensor sketch,
  1,024 x 2 draws; the exact target readout, ``exact_readout=8``; the Adam preconditioner off, as
  at the start of fine-tuning) over the same source batches plus the target batches, into a fresh
  store (what the callback does at its first validation).

The two are timed alternately (best of ``--repeats``). ``throughput_ratio`` = train seconds / harvest
seconds over the same source samples (the target readout's extra pass is counted in the harvest).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_harvest_throughput.py

writes ``benchmarks/results/lm_harvest_throughput.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

SPEC = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=2048, n_positions=64, bos_token_id=None, eos_token_id=None)
BATCH, PROMPT, ANSWER, SOURCE_BATCHES, TARGET_BATCHES = 16, 40, 24, 8, 2


def _loader(n_batches: int, seed: int, tasks: int = 4):
    """A DataLoader of dict samples (collated into HF-style batches), all prompts of one length."""
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n_batches * BATCH):
        ids = torch.randint(1, SPEC["vocab_size"], (PROMPT + ANSWER,), generator=g)
        labels = ids.clone()
        labels[:PROMPT] = -100
        samples.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                        "task": i % tasks})
    return DataLoader(samples, batch_size=BATCH)


def main(repeats: int) -> None:
    import torch
    import transformers

    from lightning_ksm.harvesting.runner import HarvestRunner

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SPEC))
    source, target = _loader(SOURCE_BATCHES, 0), _loader(TARGET_BATCHES, 1, tasks=1)

    def train():
        net = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SPEC))
        net.load_state_dict(model.state_dict())
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        for batch in source:
            logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                     ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def harvest():
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = HarvestRunner(model, Path(tmp) / "h", config={"output": "sequence"})
            runner.initialize_store()
            runner.run([("source", source), ("target", target)])
            return runner.projector.config()["kind"]

    kind = harvest()  # warm-up
    train()
    times = {"train": [], "harvest": []}
    for _ in range(repeats):
        for name, fn in (("train", train), ("harvest", harvest)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    best = {k: min(v) for k, v in times.items()}
    row = {"model": SPEC, "batch": BATCH, "tokens": PROMPT + ANSWER, "answer_tokens": ANSWER,
           "source_batches": SOURCE_BATCHES, "target_batches": TARGET_BATCHES,
           "n_params": sum(p.numel() for p in model.parameters()), "projection": kind,
           "train_seconds": best["train"], "harvest_seconds": best["harvest"],
           "throughput_ratio": best["train"] / best["harvest"], "all_seconds": times,
           "target": ">= 0.5 (issue 24 item 5)"}
    print(row)
    write_results("lm_harvest_throughput", {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lm_harvest_throughput.py", "threads": 1,
        "result": row})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    main(parser.parse_args().repeats)
