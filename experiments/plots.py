"""Optuna's plots of a study, for its parent run: one interactive page and one PNG each."""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import optuna

from experiments.studies import OBJECTIVE_METRIC

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


def log_study_plots(study: optuna.Study, folder: Path) -> None:
    """Optuna's plots as one self-contained interactive page, ``study.html`` (plotly.js inlined once,
    so it works offline and in the MLflow UI), and one PNG each (matplotlib); skip those the study
    cannot draw yet."""
    import matplotlib.pyplot as plt  # its backend is the entry point's choice (tune.main: Agg)
    import optuna.visualization as interactive
    import optuna.visualization.matplotlib as static

    folder.mkdir(parents=True, exist_ok=True)
    sections = []
    # A multi-objective study: these plots show its first objective, val_accuracy (the front has its own).
    target = {"target": lambda t: t.values[0], "target_name": OBJECTIVE_METRIC} if len(study.directions) > 1 else {}
    for name in PLOTS:
        kwargs = target if name != "intermediate_values" else {}
        try:
            with warnings.catch_warnings(), optuna_quiet():
                warnings.simplefilter("ignore")  # matplotlib plots are 'experimental'
                figure = getattr(interactive, f"plot_{name}")(study, **kwargs)
                axes = getattr(static, f"plot_{name}")(study, **kwargs)
            # The first figure carries plotly.js; the others use it.
            sections.append(
                f"<h2>{name.replace('_', ' ')}</h2>\n" + figure.to_html(full_html=False, include_plotlyjs=not sections)
            )
            picture = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            picture.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
            plt.close(picture)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:  # e.g. importances of one trial
            print(f"note: no {name} plot yet ({error})", file=sys.stderr)
    if sections:
        title = f"study {study.study_name}: {len(study.trials)} trials"
        (folder / "study.html").write_text(
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{title}</title></head>"
            f"<body><h1>{title}</h1>\n" + "\n".join(sections) + "\n</body></html>\n"
        )
