"""Real proximal fine-tuning on one task subset: ground truth for GradEx on small problems."""

from __future__ import annotations

__all__ = ["proximal_finetune"]


def proximal_finetune(model, w0, inputs, labels, task_ids, subset, *, n_tasks: int, lam: float, steps: int, lr: float):
    """Really fine-tune ``model`` from the weights ``w0`` (a name -> tensor dict) on one task subset.

    The objective is GradEx's (paper eq. 1 with the proximal term of eq. 9): every selected task's
    mean cross-entropy, averaged over the selected tasks, plus ``lam/2 |W - W0|^2``; full-batch Adam
    with a cosine schedule. The model's own parameters are not touched (the weights are passed
    functionally). Returns the fine-tuned weights as a dict. This is ground truth for small problems.
    """
    import torch
    from torch.func import functional_call

    counts = torch.bincount(task_ids, minlength=n_tasks).float()
    s = torch.as_tensor(subset, dtype=torch.float32)
    weight = (s / (s.sum() * counts))[task_ids]
    params = {k: v.clone().requires_grad_(True) for k, v in w0.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        out = functional_call(model, params, (inputs,))
        per_sample = torch.nn.functional.cross_entropy(out, labels, reduction="none")
        prox = sum(((params[k] - w0[k]) ** 2).sum() for k in w0)
        ((weight * per_sample).sum() + 0.5 * lam * prox).backward()
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in params.items()}
