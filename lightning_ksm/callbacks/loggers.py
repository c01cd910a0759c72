"""Logging a report to the Trainer's loggers: the summary metrics everywhere, and the report where
the logger can hold it: TensorBoard (text report + score heatmap image), W&B (a ``ksm/scores``
table and the HTML report as ``ksm/report``), MLflow (the report directory as the run's
``ksm_report`` artifacts)."""

from __future__ import annotations

import os

from lightning_utilities.core.rank_zero import rank_zero_warn

__all__ = ["log_report"]


def log_report(trainer, report, report_dir: str) -> None:
    """Log ``report.summary_metrics()`` to every logger at the current step, plus rich views."""
    metrics = report.summary_metrics()
    step = trainer.global_step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        _log_rich(logger, report, report_dir, step)
        logger.save()


def _log_rich(logger, report, report_dir: str, step: int) -> None:
    # The imports are optional and a failure here only warns: logging must never fail the run.
    name = type(logger).__name__
    try:
        if name == "TensorBoardLogger":
            writer = logger.experiment
            writer.add_text("ksm/report", "```\n" + report.to_text(max_rows=10) + "\n```", global_step=step)
            png = os.path.join(report_dir, "scores.png")
            if os.path.exists(png):
                from matplotlib.image import imread

                writer.add_image("ksm/scores", imread(png)[..., :3], global_step=step, dataformats="HWC")
        elif name == "WandbLogger":
            rows = [[t, task, float(s)] for t in report.target_names for task, s in report.ranked(target=t)]
            logger.log_table(key="ksm/scores", columns=["target", "task", "score"], data=rows, step=step)
            html = os.path.join(report_dir, "report.html")
            if os.path.exists(html):
                import wandb

                with open(html, encoding="utf-8") as fh:
                    logger.experiment.log({"ksm/report": wandb.Html(fh.read(), inject=False)})
        elif name == "MLFlowLogger":
            logger.experiment.log_artifacts(logger.run_id, report_dir, artifact_path="ksm_report")
    except Exception as exc:
        rank_zero_warn(f"TaskAttribution: could not log a figure/table to {name}: {exc}")
