"""Optuna's plots of a study, for its parent run: one interactive page and one PNG each (the
learning curves drawn here: Optuna's PNG does not read past a dozen trials)."""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import TrialState

from experiments.studies import OBJECTIVE_METRIC
from experiments.trials import complete, most_accurate
from pipeline.config import say

PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate", "slice", "contour")


@contextmanager
def optuna_quiet():
    """Optuna's own log at ERROR: the contour plot warns once per pair of parameters that hold a
    single value (num_layers when every complete trial has 2), dozens of lines on a small study."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def learning_curves(study: optuna.Study):
    """Each trial's reported val_accuracy by epoch, as a PNG that reads with dozens of trials (Optuna's
    gives each trial a colour and a legend entry): one colour per outcome, pruned curves ending in an
    x where the pruner stopped them, the best trial drawn last, labelled."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    trials = [t for t in study.trials if t.intermediate_values]
    if not trials:
        raise ValueError("no trial has reported an epoch")
    _, axes = plt.subplots(figsize=(8, 4.5))
    colours = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "0.65"}  # else (running, failed) red
    labelled = set()
    for trial in trials:
        epochs, values = zip(*sorted(trial.intermediate_values.items()), strict=True)
        state = trial.state.name.lower()
        label = None if state in labelled else (f"{state}, stopped at the x" if trial.state == TrialState.PRUNED else state)
        axes.plot(epochs, values, color=colours.get(trial.state, "tab:red"), linewidth=1, alpha=0.8, label=label)
        labelled.add(state)
        if trial.state == TrialState.PRUNED:
            axes.plot(epochs[-1], values[-1], "x", color=colours[TrialState.PRUNED])
    if finished := [t for t in trials if t.state == TrialState.COMPLETE]:
        best = most_accurate(finished)  # the rule the trial lines' "best" follows
        epochs, values = zip(*sorted(best.intermediate_values.items()), strict=True)
        axes.plot(epochs, values, color="tab:orange", linewidth=2.5, label=f"best: trial {best.number} ({best.values[0]:.4f})")
    # The y axis shows where trials end, from below the 5th percentile of the last values reported,
    # so one diverged trial does not flatten the others; the title counts the curves that dip below.
    top = max(max(t.intermediate_values.values()) for t in trials)
    low = np.percentile([t.intermediate_values[max(t.intermediate_values)] for t in trials], 5)
    bottom = low - (0.5 * (top - low) or 0.01)
    axes.set_ylim(bottom, top + 0.05 * (top - bottom))
    below = sum(min(t.intermediate_values.values()) < bottom for t in trials)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(Counter(t.state.name.lower() for t in trials).items()))
    axes.set_title(f"{study.study_name}: {len(trials)} trials ({counts})" + (f"; {below} dip below the chart" if below else ""))
    axes.set(xlabel="epoch", ylabel=OBJECTIVE_METRIC)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return axes


def most_important(study: optuna.Study, evaluator, target=None) -> list[str]:
    """The two parameters that matter most to the objective: the contour plot's pair. Optuna's contour
    of every pair is a grid of n x n panels, unreadable for the GPU study's six parameters and most of the
    summary's time. Raises ValueError, as the importances plot does, before two trials are complete."""
    names = sorted({name for trial in complete(study) for name in trial.params})
    if len(names) <= 2:
        return names
    return list(optuna.importance.get_param_importances(study, evaluator=evaluator, target=target))[:2]


def log_study_plots(study: optuna.Study, folder: Path) -> None:
    """Optuna's plots as one self-contained page, ``study.html`` (plotly.js inlined once: it works
    offline and in the MLflow UI), and one PNG each; those the study cannot draw yet are skipped."""
    import matplotlib.pyplot as plt  # its backend is the entry point's choice (tune.main: Agg)
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static
    from optuna.importance import FanovaImportanceEvaluator  # imports scikit-learn: only the summary pays it

    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    # A multi-objective study: these plots show its first objective, val_accuracy (the front has its own).
    target = {"target_name": OBJECTIVE_METRIC}  # the metric's own name, not Optuna's "Objective Value"
    if len(study.directions) > 1:
        target["target"] = lambda t: t.values[0]
    evaluator = FanovaImportanceEvaluator(seed=0)  # the same ranking in the importances plot and the contour's pair
    for name in PLOTS:
        kwargs = target if name != "intermediate_values" else {}
        try:
            if name == "param_importances":
                kwargs = {**kwargs, "evaluator": evaluator}
            if name == "contour":
                kwargs = {**kwargs, "params": most_important(study, evaluator, target.get("target"))}
            with warnings.catch_warnings(action="ignore"), optuna_quiet():  # matplotlib plots are 'experimental'
                figure = getattr(interactive, f"plot_{name}")(study, **kwargs)
                draw = learning_curves if name == "intermediate_values" else getattr(static, f"plot_{name}")
                axes = draw(study, **kwargs)
            # The first figure carries plotly.js; the others use it.
            sections.append(
                f"<h2>{name.replace('_', ' ')}</h2>\n" + figure.to_html(full_html=False, include_plotlyjs=not sections)
            )
            picture = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            picture.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(picture)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. importances of one trial
            say(f"note: no {name} plot yet ({error})")
    if sections:
        title = f"study {study.study_name}: {len(study.trials)} trials"
        (folder / "study.html").write_text(
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
        )
