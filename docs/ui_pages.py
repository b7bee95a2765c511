"""What docs/screenshots.py photographs: the runs each picture shows, found in a tracking store by
their tags (stage, trial state), and the MLflow UI pages that show them: each page's URL, the
browser state a user would set with a few clicks (MLflow 3.17's local-storage keys), and what its
DOM must show."""

from __future__ import annotations

import ast
import sys
from collections import Counter
from dataclasses import dataclass

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

CHART_METRICS = ("val_accuracy", "train_loss")
TABLE_PARAMS = ("learning_rate",)
TABLE_METRICS = ("best_val_accuracy", "test_accuracy")
EXPANDED_STUDY = 20  # the runs table expands the study when it has at most this many child runs


@dataclass
class Runs:
    """The runs the pictures show, by role."""

    experiment_id: str
    pipelines: dict[str, list[str]]  # the newest finished pipeline runs -> their stage run ids
    study: str  # the study's parent run id
    study_children: list[str]  # every run nested under it: trials, confirm and evaluate runs, prepare, workers
    trials: list[str]  # the trials its chart draws, in trial order
    params: list[str]  # the parameters the study searched
    trained: list[str]  # the fully trained models: the pipelines' train runs and the study's confirm runs
    names: dict[str, str]  # run id -> run name, of every run in the experiment
    parents: dict[str, str]  # run id -> the run it is nested under, of every nested run


def find_study(client: MlflowClient, name: str, experiment: str | None) -> Run:
    """The parent run of the study ``name`` (stage tag ``tune``, the study's name as its run name:
    experiments/parent_run.py), in ``experiment``, or in whichever experiment holds it if None."""
    if experiment is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    elif found := client.get_experiment_by_name(experiment):
        experiment_ids = [found.experiment_id]
    else:
        sys.exit(f"screenshots: the store has no experiment {experiment!r}")
    studies = client.search_runs(experiment_ids, "tags.`pipeline.stage` = 'tune'", order_by=["attributes.start_time DESC"])
    matching = [r for r in studies if r.info.run_name == name]
    if not matching:
        there = ", ".join(sorted({r.info.run_name for r in studies})) or "none"
        sys.exit(f"screenshots: no study {name!r} in the store (its studies: {there})")
    if len({r.info.experiment_id for r in matching}) > 1:
        sys.exit(f"screenshots: several experiments hold a study {name!r}: choose one with --experiment")
    return matching[0]  # the newest, should the study have opened a new parent run


def stage(run: Run) -> str | None:
    return run.data.tags.get("pipeline.stage")


def find_runs(client: MlflowClient, study: Run, newest_pipelines: int, chart_trials: int) -> Runs:
    """What the pictures show, from the experiment holding the study's parent run ``study``."""
    runs = []  # every run of the experiment, newest first: the browser's view state names each
    page = client.search_runs([study.info.experiment_id], order_by=["attributes.start_time DESC"])
    runs += page
    while page.token:
        page = client.search_runs([study.info.experiment_id], order_by=["attributes.start_time DESC"], page_token=page.token)
        runs += page
    parents = {r.info.run_id: r.data.tags["mlflow.parentRunId"] for r in runs if "mlflow.parentRunId" in r.data.tags}
    children: dict[str | None, list[Run]] = {}
    for r in runs:
        children.setdefault(parents.get(r.info.run_id), []).append(r)
    mains = [r for r in runs if stage(r) == "main" and r.info.status == "FINISHED"][:newest_pipelines]
    nested = children.get(study.info.run_id, [])
    trials = best_trials(nested, chart_trials)
    # A pipeline's train run is its own, or the finished twin it reused (nested under an older pipeline).
    trained = [p.data.tags["pipeline.train_run"] for p in mains if "pipeline.train_run" in p.data.tags]
    trained += [r.info.run_id for r in nested if stage(r) == "confirm" and r.info.status == "FINISHED"]
    return Runs(
        study.info.experiment_id,
        {p.info.run_id: [c.info.run_id for c in children.get(p.info.run_id, [])] for p in mains},
        study.info.run_id,
        [r.info.run_id for r in nested],
        [t.info.run_id for t in trials],
        searched_params(study, trials),
        list(dict.fromkeys(trained)),
        {r.info.run_id: r.info.run_name for r in runs},
        parents,
    )


def best_trials(nested: list[Run], most: int) -> list[Run]:
    """The study's complete trials, the ``most`` best by best_val_accuracy, in trial order. Pruned
    trials are left out: they stop before logging best_val_accuracy, which the chart plots."""
    complete = [
        r
        for r in nested
        if stage(r) == "trial" and r.data.tags.get("optuna.trial_state") == "COMPLETE" and "best_val_accuracy" in r.data.metrics
    ]
    best = sorted(complete, key=lambda r: r.data.metrics["best_val_accuracy"], reverse=True)[:most]
    return sorted(best, key=lambda r: int(r.data.tags["optuna.trial_number"]))


def searched_params(study: Run, trials: list[Run]) -> list[str]:
    """The parameters the study searched, those ``trials`` logged: the keys of its parent's
    ``search_space`` (a dict's repr, experiments/parent_run.py), else those that differ among them."""
    try:
        space = list(ast.literal_eval(study.data.params["search_space"]))
    except (KeyError, ValueError, SyntaxError, TypeError):
        space = sorted({k for t in trials for k in t.data.params if len({u.data.params.get(k) for u in trials}) > 1})
    return [k for k in space if any(k in t.data.params for t in trials)]


@dataclass
class Page:
    file: str
    url: str  # after the server's address
    view: dict  # the runs page's view state in local storage (empty: MLflow's defaults)
    expected: list[tuple[str, str, int]]  # (label, text in the DOM, how many times at least)
    skipped: str = ""  # why the picture is not taken: it would have nothing to draw (empty: it is taken)


def pages(runs: Runs) -> list[Page]:
    """The three pictures: each is the classic runs page (not the GenAI view that MLflow 3.17 opens
    by default) in a view a user would set up with a few clicks."""
    experiment = f"/#/experiments/{runs.experiment_id}/runs?workflowType=machine_learning"
    study_expanded = len(runs.study_children) <= EXPANDED_STUDY  # a long list would push the pipelines off the page
    table = [*runs.pipelines, *(c for stages in runs.pipelines.values() for c in stages), runs.study]
    table += runs.study_children if study_expanded else []
    return [
        Page(
            "runs-table.png",
            experiment,
            {
                "runsExpanded": expanded(runs, [*runs.pipelines, *([runs.study] if study_expanded else [])]),
                # The data and the registered model, then what tells the runs apart.
                "selectedColumns": [f"attributes.`{c}`" for c in ("Models", "Dataset")]
                + [f"params.`{p}`" for p in TABLE_PARAMS]
                + [f"metrics.`{m}`" for m in TABLE_METRICS],
            },
            shows_runs(runs, table),
            "" if runs.pipelines else "no finished pipeline (a run tagged pipeline.stage=main) in the study's experiment",
        ),
        Page(
            "study-compare.png",
            experiment + "&compareRunsMode=CHART",
            {
                **chart_view(runs, runs.trials, "^(best_val_accuracy|val_accuracy)$"),
                "runsExpanded": expanded(runs, [runs.study]),
                "compareRunCharts": [
                    {
                        **chart("parallel", "PARALLEL"),
                        "selectedParams": runs.params,
                        "selectedMetrics": ["best_val_accuracy"],
                    },
                    # Deleted: the parallel coordinates show it; val_accuracy's chart is generated after it.
                    {**chart("best", "BAR", deleted=True), "metricKey": "best_val_accuracy"},
                ],
            },
            shows_runs(runs, runs.trials)
            + curves(runs, runs.trials, ("val_accuracy",))
            + [("its parallel coordinates", ">Parallel Coordinates<", 1)],
            "" if runs.trials else "the study has no complete trial (optuna.trial_state=COMPLETE, with best_val_accuracy)",
        ),
        Page(
            "learning-curves.png",
            experiment + "&compareRunsMode=CHART",
            {
                **chart_view(runs, runs.trained, "^(" + "|".join(CHART_METRICS) + ")$"),
                "runsExpanded": expanded(runs, [runs.parents[r] for r in runs.trained if r in runs.parents]),
                "compareRunCharts": [],  # MLflow adds one per metric
            },
            shows_runs(runs, runs.trained) + curves(runs, runs.trained, CHART_METRICS),
            "" if runs.trained else "no fully trained model: no finished pipeline, and the study has no finished confirm run",
        ),
    ]


def expanded(runs: Runs, parents: list[str]) -> dict[str, bool]:
    """The runs page's ``runsExpanded``: ``parents`` and the runs they are nested under, whose
    children the table shows only once they are expanded too."""
    shown: dict[str, bool] = {}
    for run_id in parents:
        while run_id and run_id not in shown:
            shown[run_id] = True
            run_id = runs.parents.get(run_id)
    return shown


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
