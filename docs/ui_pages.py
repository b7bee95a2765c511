"""The MLflow UI pages docs/screenshots.py photographs: each page's URL, the browser state a user
would set with a few clicks (MLflow 3.17's local-storage keys), and what its DOM must show."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from screenshots import Runs

CHART_METRICS = ("val_accuracy", "train_loss")
TABLE_PARAMS = ("learning_rate",)
TABLE_METRICS = ("best_val_accuracy", "test_accuracy")
STUDY_PARAMS = ("hidden_size", "learning_rate")  # what the smoke study samples


@dataclass
class Page:
    file: str
    url: str  # after the server's address
    view: dict  # the runs page's view state in local storage (empty: MLflow's defaults)
    expected: list[tuple[str, str, int]]  # (label, text in the DOM, how many times at least)


def pages(runs: Runs) -> list[Page]:
    """The three pictures: each is the classic runs page (not the GenAI view that MLflow 3.17 opens
    by default) in a view a user would set up with a few clicks."""
    experiment = f"/#/experiments/{runs.experiment_id}/runs?workflowType=machine_learning"
    table = [*runs.pipelines, *(c for stages in runs.pipelines.values() for c in stages), runs.study, *runs.trials]
    return [
        Page(
            "runs-table.png",
            experiment,
            {
                "runsExpanded": {run_id: True for run_id in [*runs.pipelines, runs.study]},
                # The data and the registered model, then what tells the runs apart.
                "selectedColumns": [f"attributes.`{c}`" for c in ("Models", "Dataset")]
                + [f"params.`{p}`" for p in TABLE_PARAMS]
                + [f"metrics.`{m}`" for m in TABLE_METRICS],
            },
            shows_runs(runs, table),
        ),
        Page(
            "study-compare.png",
            experiment + "&compareRunsMode=CHART",
            {
                **chart_view(runs, runs.trials, "^(best_val_accuracy|val_accuracy)$"),
                "runsExpanded": {runs.study: True},
                "compareRunCharts": [
                    {
                        **chart("parallel", "PARALLEL"),
                        "selectedParams": list(STUDY_PARAMS),
                        "selectedMetrics": ["best_val_accuracy"],
                    },
                    # Deleted: the parallel coordinates show it; val_accuracy's chart is generated after it.
                    {**chart("best", "BAR", deleted=True), "metricKey": "best_val_accuracy"},
                ],
            },
            shows_runs(runs, runs.trials)
            + curves(runs, runs.trials, ("val_accuracy",))
            + [("its parallel coordinates", ">Parallel Coordinates<", 1)],
        ),
        Page(
            "learning-curves.png",
            experiment + "&compareRunsMode=CHART",
            {
                **chart_view(runs, runs.trained, "^(" + "|".join(CHART_METRICS) + ")$"),
                "runsExpanded": {run_id: True for run_id in [*runs.pipelines, runs.study]},
                "compareRunCharts": [],  # MLflow adds one per metric
            },
            shows_runs(runs, runs.trained) + curves(runs, runs.trained, CHART_METRICS),
        ),
    ]


def chart_view(runs: Runs, visible: list[str], charts: str) -> dict:
    """The chart view of the runs ``visible``, its charts those whose names match the regular expression ``charts``."""
    return {
        "runsVisibilityMap": {run_id: run_id in visible for run_id in runs.names},  # the runs the charts draw
        "chartsSearchFilter": charts,
        "compareRunSections": [
            {
                "uuid": "section",
                "name": "Model metrics",
                "display": True,
                "isReordered": False,
                "deleted": False,
                "isGenerated": True,
            }
            | {"columns": 2, "cardHeight": 480}  # two large charts to a row, not three small ones
        ],
    }


def chart(uuid: str, kind: str, deleted: bool = False) -> dict:
    return {
        "uuid": uuid,
        "type": kind,
        "runsCountToCompare": 10,
        "metricSectionId": "section",
        "deleted": deleted,
        "isGenerated": False,
    }


def shows_runs(runs: Runs, run_ids: list[str]) -> list[tuple[str, str, int]]:
    """Each run's id (in its link) and name (as a text node, once per run of that name)."""
    names = Counter(runs.names[r] for r in run_ids)
    return [(f"{runs.names[r]} ({r})", r, 1) for r in run_ids] + [(name, f">{name}<", n) for name, n in names.items()]


def curves(runs: Runs, run_ids: list[str], metrics: tuple[str, ...]) -> list[tuple[str, str, int]]:
    """A legend entry per run and metric: the run's curve is drawn."""
    names = Counter(runs.names[r] for r in run_ids)
    return [(f"the {metric} curve of {name}", f">{name} ({metric})<", n) for metric in metrics for name, n in names.items()]
