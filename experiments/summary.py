"""What a study leaves behind once no trial runs: a leaderboard and plots on its parent run, and
its best trial's own model registered, tested once, and made champion when validation says so.

Selection is by ``val_accuracy``, the study's objective. The test set is looked at once per
registered version, on the registered artifact, and only reported: it never picks anything.
A multi-objective study (val_accuracy and parameter_count) also leaves its Pareto front, as a
table and a plot, and registers the compact rule's pick under the alias ``compact``
(experiments/pareto.py).
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from experiments.coordination import counted
from experiments.pareto import COMPACT, compact_trial, complete, cost_name, format_cost, front_figure, front_table, most_accurate
from experiments.studies import OBJECTIVE_METRIC
from pipeline.config import EvaluateConfig
from pipeline.data import PreparedData
from pipeline.evaluate import evaluate_and_log, load_model
from pipeline.tables import markdown_table
from pipeline.tracking import ui_link
from pipeline.training import resolve_device

CHAMPION = "champion"
MODEL_URI_ATTR = "model_uri"  # trial user attribute: the model it logged, when it was the best so far
MLFLOW_RUN_ATTR = "mlflow_run_id"  # trial user attribute: its child run
SUMMARISED_ATTR = "summarised_at"  # study user attribute: how many counted trials the last summary saw
REGISTERED_ATTR = "registered"  # study user attribute: the version registered from its best trial
COMPACT_ATTR = "compact"  # study user attribute: the version the compact rule picked (multi-objective studies)


@dataclass(frozen=True)
class Registered:
    """A model version registered from a study's best trial."""

    name: str
    version: str
    trial: int
    val_accuracy: float
    test_accuracy: float
    champion: bool  # whether it held the champion alias when registered
    why_not_champion: str = ""  # one line, when it did not take the alias


def model_name(register_name: str, dataset: str) -> str:
    """The registered model a study's versions go to: ``auto`` is ``lstm-<dataset>``."""
    return f"lstm-{dataset}" if register_name == "auto" else register_name


def needs_summary(study: optuna.Study) -> bool:
    """Whether the counted trials changed since the last successful summary."""
    return study.user_attrs.get(SUMMARISED_ATTR) != len(counted(study.get_trials(deepcopy=False)))


def summarise(
    study: optuna.Study,
    parent_run_id: str,
    register_name: str,
    data: PreparedData,
    data_ref: str,
    device: str,
    compact_within: float = 0.002,
) -> Registered | None:
    """Log the leaderboard and plots to the parent run, register the best trial's model (and, in a
    multi-objective study, log the Pareto front and register the compact rule's pick); call
    holding the study lock once no trial runs. Recorded as done only when all of it succeeded."""
    client = MlflowClient()
    trials = counted(study.get_trials(deepcopy=False))
    board = leaderboard(study)
    multi_objective = len(study.directions) > 1
    compact = compact_trial(complete(study), compact_within) if multi_objective and complete(study) else None
    with tempfile.TemporaryDirectory() as tmp:
        board.to_csv(f"{tmp}/leaderboard.csv", index=False)
        board.to_html(f"{tmp}/leaderboard.html", index=False, float_format="{:.4f}".format, na_rep="")
        log_study_plots(study, Path(tmp) / "plots")
        if compact is not None:
            Path(tmp, "plots").mkdir(exist_ok=True)
            front = front_table(study)
            front.to_csv(f"{tmp}/pareto_front.csv", index=False)
            Path(tmp, "pareto_front.md").write_text(markdown_table(front) + "\n")
            front_figure(study, compact).savefig(Path(tmp, "plots", "pareto_front.png"), dpi=110)
        client.log_artifacts(parent_run_id, tmp)
    states = pd.Series([trial.state.name for trial in trials]).value_counts()
    for state in ("COMPLETE", "PRUNED", "FAIL"):
        client.log_metric(parent_run_id, f"n_{state.lower()}_trials", int(states.get(state, 0)), step=len(trials))
    registered = None
    if states.get("COMPLETE", 0):
        best = most_accurate(complete(study))
        client.log_metric(parent_run_id, f"best_{OBJECTIVE_METRIC}", best.values[0], step=len(trials))
        client.set_tag(parent_run_id, "best.trial_number", str(best.number))
        for name, value in best.params.items():
            client.set_tag(parent_run_id, f"best.{name}", str(value))
        registered = register_best(study, best, parent_run_id, register_name, data, data_ref, device)
    if compact is not None:
        client.set_tag(parent_run_id, "compact.trial_number", str(compact.number))
        rule = f"smallest {cost_name(study)} within {compact_within} of the best {OBJECTIVE_METRIC}"
        client.set_tag(parent_run_id, "compact.rule", rule)
        register_compact(study, compact, registered, parent_run_id, register_name, data, data_ref, device)
    client.set_terminated(parent_run_id, "FINISHED")
    study.set_user_attr(SUMMARISED_ATTR, len(trials))  # last: a summary that failed halfway is redone
    return registered


def leaderboard(study: optuna.Study) -> pd.DataFrame:
    """Every trial, best first: number, val_accuracy, state, parameters, seconds, attributes."""
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    trials = trials.rename(columns={"value": OBJECTIVE_METRIC, "values_0": OBJECTIVE_METRIC, "values_1": cost_name(study)})
    if "duration" in trials:
        trials["duration"] = trials["duration"].dt.total_seconds().round(1)
    return trials.sort_values(OBJECTIVE_METRIC, ascending=False, na_position="last")


def register_best(
    study: optuna.Study,
    best: optuna.trial.FrozenTrial,
    parent_run_id: str,
    register_name: str,
    data: PreparedData,
    data_ref: str,
    device: str,
) -> Registered | None:
    """Register the model the best trial logged, unless it already is; test it once; maybe crown it."""
    previous = study.user_attrs.get(REGISTERED_ATTR)
    if previous and previous["trial"] == best.number and previous["name"] == register_name:
        return Registered(**previous)  # the best trial did not change: nothing new to register or test
    made = register_trial(study, best, parent_run_id, register_name, data, data_ref, device)
    if not made:
        return None
    version, test_accuracy = made
    why_not = crown_if_better(register_name, version, best.values[0], validation_data(data))
    registered = Registered(register_name, version, best.number, best.values[0], test_accuracy, not why_not, why_not)
    study.set_user_attr(REGISTERED_ATTR, asdict(registered))
    return registered


def register_compact(
    study: optuna.Study,
    compact: optuna.trial.FrozenTrial,
    best: Registered | None,
    parent_run_id: str,
    register_name: str,
    data: PreparedData,
    data_ref: str,
    device: str,
) -> Registered | None:
    """Give the compact rule's pick the alias ``compact``: the best trial's version when it is the
    same trial (tested once already), else its own version, registered and tested once."""
    previous = study.user_attrs.get(COMPACT_ATTR)
    if previous and previous["trial"] == compact.number and previous["name"] == register_name:
        registered = Registered(**previous)
    elif best and best.trial == compact.number:
        registered = best
    else:
        made = register_trial(study, compact, parent_run_id, register_name, data, data_ref, device)
        if not made:
            return None
        version, test_accuracy = made
        registered = Registered(register_name, version, compact.number, compact.values[0], test_accuracy, False)
    MlflowClient().set_registered_model_alias(register_name, COMPACT, registered.version)
    study.set_user_attr(COMPACT_ATTR, asdict(registered))
    return registered


def register_trial(
    study: optuna.Study,
    trial: optuna.trial.FrozenTrial,
    parent_run_id: str,
    register_name: str,
    data: PreparedData,
    data_ref: str,
    device: str,
) -> tuple[str, float] | None:
    """Register the model ``trial`` logged, with its lineage (``lineage_tags``), and test it once;
    its version and test_accuracy."""
    model_uri = trial.user_attrs.get(MODEL_URI_ATTR)
    if not model_uri:
        print(f"warning: trial {trial.number} logged no model, so nothing is registered", file=sys.stderr)
        return None
    tags = lineage_tags(study, trial, data)
    version = str(mlflow.register_model(model_uri, register_name, tags=tags).version)
    test_accuracy = test_once(f"models:/{register_name}/{version}", parent_run_id, data, data_ref, device)
    client = MlflowClient()
    client.set_model_version_tag(register_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    params = ", ".join(f"{name} {value}" for name, value in trial.params.items())
    client.update_model_version(
        register_name,
        version,
        description=f"Study {study.study_name}, trial {trial.number} ({params}): {OBJECTIVE_METRIC} {trial.values[0]:.4f} "
        f"on {data.manifest['dataset']} (validation split {tags[VAL_DIGEST_TAG][:12]}), test_accuracy {test_accuracy:.4f} "
        f"(tested once, after it was chosen). Trained in {tags['precision']}, code {tags['code_version'][:12]}"
        + (f", git commit {tags['git_commit'][:12]}." if "git_commit" in tags else "."),
    )
    return version, test_accuracy


# Version tags that say what a version was validated on: only versions that agree on both compare.
DATASET_TAG, VAL_DIGEST_TAG = "data.dataset", "data.val_sha256"


def validation_data(data: PreparedData) -> dict[str, str]:
    return {DATASET_TAG: data.manifest["dataset"], VAL_DIGEST_TAG: data.manifest["splits"]["val"]["sha256"]}


def lineage_tags(study: optuna.Study, trial: optuna.trial.FrozenTrial, data: PreparedData) -> dict[str, str]:
    """What a reviewer needs to trust a version: its data (dataset, each split's sha256), its study
    and trial, the trial's parameters, its validation score, precision and code version."""
    from pipeline.main import code_version

    tags = {"optuna.study_name": study.study_name, "optuna.trial_number": str(trial.number)}
    tags[OBJECTIVE_METRIC] = f"{trial.values[0]:.6f}"
    if len(trial.values) > 1:
        cost = cost_name(study)
        tags[cost] = format_cost(cost, trial.values[1]).replace(",", "")  # a tag is read by programs: no separators
    tags.update(validation_data(data))
    tags.update({f"data.{split}_sha256": data.manifest["splits"][split]["sha256"] for split in ("train", "test")})
    tags.update({f"param.{name}": str(value) for name, value in trial.params.items()})
    run = MlflowClient().get_run(trial.user_attrs[MLFLOW_RUN_ATTR]) if MLFLOW_RUN_ATTR in trial.user_attrs else None
    tags["precision"] = run.data.params.get("resolved_precision", "unknown") if run else "unknown"
    tags["code_version"] = code_version()
    parent = (
        MlflowClient().get_run(run.data.tags["mlflow.parentRunId"]) if run and "mlflow.parentRunId" in run.data.tags else None
    )
    if parent and (commit := parent.data.tags.get("mlflow.source.git.commit")):  # `mlflow run` records it
        tags["git_commit"] = commit
    return tags


def test_once(model_uri: str, parent_run_id: str, data: PreparedData, data_ref: str, device: str) -> float:
    """Evaluate the registered artifact on the test set, in an evaluate run under the study's parent."""
    torch_device = resolve_device(device)
    model, input_shape, _ = load_model(model_uri, torch_device)
    experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    tags = {"pipeline.stage": "evaluate", "pipeline.model": model_uri, "pipeline.data": data_ref}
    with mlflow.start_run(
        run_name=f"evaluate {model_uri.removeprefix('models:/')}",
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        tags=tags,
    ):
        evaluation = evaluate_and_log(
            model,
            dataclasses.replace(data, test=data.test.to(torch_device)),
            input_shape,
            EvaluateConfig(device=device),
            data_ref,
            model_uri,
        )
    return evaluation.test_accuracy


def crown_if_better(name: str, version: str, val_accuracy: float, validated_on: dict[str, str]) -> str:
    """Move the champion alias to ``version`` if the champion was validated on the same data
    (``validated_on``: dataset and validation split digest) and its val_accuracy is lower. Returns
    "" when it moved, else why not in one line: a version validated on other data (another dataset,
    a smaller split) is registered, but never compared."""
    client = MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:  # no champion yet
        champion = None
    if champion:
        differs = [
            f"{key} {champion.tags.get(key, 'unrecorded')[:16]}"
            for key, value in validated_on.items()
            if champion.tags.get(key) != value
        ]
        if differs:
            return (
                f"not compared with champion version {champion.version}, validated on other data ({', '.join(differs)}); "
                "move the alias by hand if this one should serve"
            )
        to_beat = float(champion.tags.get(OBJECTIVE_METRIC, "-1"))
        if val_accuracy <= to_beat:
            return f"champion version {champion.version} has {OBJECTIVE_METRIC} {to_beat:.4f} on the same data"
    client.set_registered_model_alias(name, CHAMPION, version)
    return ""


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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


def report(study: optuna.Study, registered: Registered | None, experiment_id: str, top: int = 5) -> str:
    """The lines a person reads at the end: the best trials as a table, the champion, and where to look."""
    board = leaderboard(study)
    params = [c for c in board.columns if c.startswith("params_")]
    columns = ["number", OBJECTIVE_METRIC, cost_name(study), "state", *params, "duration"]
    table = board[[c for c in columns if c in board]].head(top)
    table.columns = [c.removeprefix("params_") for c in table.columns]
    lines = [
        f"study {study.study_name}: {len(counted(study.get_trials(deepcopy=False)))} trials counted; best {top}:",
        table.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
    ]
    if registered:
        role = (
            "the champion"
            if registered.champion
            else f"not the champion: {registered.why_not_champion or 'a better one holds it'}"
        )
        lines.append(
            f"registered {registered.name} version {registered.version} from trial {registered.trial}: "
            f"{OBJECTIVE_METRIC} {registered.val_accuracy:.4f}, test_accuracy {registered.test_accuracy:.4f}; {role}"
        )
    if compact := study.user_attrs.get(COMPACT_ATTR):
        lines.append(
            f"alias {COMPACT}: {compact['name']} version {compact['version']} from trial {compact['trial']}: "
            f"{OBJECTIVE_METRIC} {compact['val_accuracy']:.4f}, test_accuracy {compact['test_accuracy']:.4f}"
        )
    lines.append(f"see the trials: {ui_link(experiment_id)}")
    return "\n".join(lines)
