"""What a study leaves behind once no trial runs: a leaderboard and plots on its parent run, and
its champion candidate registered, tested once, and made champion when validation says so.

Selection is by ``val_accuracy``, the study's objective. By default the best few configurations
are first confirmed over seeds (experiments/confirm.py) and the best mean wins; with
``confirm_top=0`` the best trial's own model is registered. The test set is looked at once per
registered version, on the registered artifact, and only reported: it never picks anything.
A multi-objective study (val_accuracy and parameter_count) also leaves its Pareto front, as a
table and a plot, and registers the compact rule's pick under the alias ``compact``
(experiments/pareto.py).
"""

from __future__ import annotations

import functools
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from experiments import attributes
from experiments.confirm import champion_run, confirmation_table, log_confirmation, seed_runs, test_seed_models
from experiments.coordination import counted
from experiments.job import WorkerJob
from experiments.pareto import COMPACT, compact_pick, complete, cost_name, format_cost, front_figure, front_table, most_accurate
from experiments.plots import log_study_plots
from experiments.studies import OBJECTIVE_METRIC
from pipeline import serving
from pipeline.config import EvaluateConfig
from pipeline.data import PreparedData
from pipeline.evaluate import evaluate_and_log
from pipeline.numerics import resolve_device
from pipeline.tables import markdown_table
from pipeline.tracking import ui_link

CHAMPION = "champion"


@dataclass(frozen=True)
class Registered:
    """A model version registered from a study: the configuration of its trial ``trial``."""

    name: str
    version: str
    trial: int
    val_accuracy: float  # the registered model's own
    test_accuracy: float
    champion: bool  # whether it held the champion alias when registered
    why_not_champion: str = ""  # one line, when it did not take the alias
    seed: int | None = None  # a confirmation run's training seed; None: the trial's own run
    val_accuracy_mean: float | None = None  # its configuration's, over the confirmation seeds
    val_accuracy_std: float | None = None
    n_seeds: int = 0


@dataclass(frozen=True)
class Pick:
    """A model to register: the trial whose configuration it is, and the run that trained it."""

    trial: FrozenTrial
    run_id: str | None
    model_uri: str | None
    val_accuracy: float
    seed: int | None = None  # as in Registered
    val_accuracy_mean: float | None = None
    val_accuracy_std: float | None = None
    n_seeds: int = 0
    seed_models: tuple[tuple[int, str], ...] = ()  # confirmed: (seed, model URI) of each of its configuration's models


def trial_pick(trial: FrozenTrial) -> Pick:
    """The model a trial logged itself (when it was the best so far)."""
    return Pick(trial, attributes.run_id(trial), attributes.model_uri(trial), trial.values[0])


def model_name(register_name: str, dataset: str) -> str:
    """The registered model a study's versions go to: ``auto`` is ``lstm-<dataset>``."""
    return f"lstm-{dataset}" if register_name == "auto" else register_name


def needs_summary(study: optuna.Study) -> bool:
    """Whether the counted trials changed since the last successful summary."""
    return attributes.summarised_at(study) != len(counted(study.get_trials(deepcopy=False)))


def summarise(study: optuna.Study, queue: optuna.Study, job: WorkerJob, data: PreparedData) -> Registered | None:
    """Log the leaderboard and plots to the parent run; choose among the confirmed configurations
    (``config.confirm_top``: their runs, trained by the workers from the ``queue``,
    experiments/confirm.py) and register the champion candidate (and, in a multi-objective study,
    log the Pareto front and register the compact rule's pick). Run by the worker that took the
    queue's summary item, once no trial runs and every confirmation run is trained; recorded as
    done only when all of it succeeded."""
    client, config, parent_run_id, data_ref = MlflowClient(), job.config, job.parent_run_id, job.data_ref
    trials = counted(study.get_trials(deepcopy=False))
    multi_objective = len(study.directions) > 1
    compact = compact_pick(study, config, data, parent_run_id) if multi_objective and complete(study) else None
    log_tables_and_plots(study, parent_run_id, compact)
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
        runs = seed_runs(queue, job) if config.confirm_top else None
        pick = confirmed_pick(study, runs, job) if runs is not None and len(runs) else trial_pick(best)
        registered = register_best(study, pick, parent_run_id, config.register_name, data, data_ref, config.device)
        if registered and pick.seed_models:  # the configuration's test accuracy, not one seed's
            test = functools.partial(test_once, parent_run_id=parent_run_id, data=data, data_ref=data_ref, device=config.device)
            print(test_seed_models(parent_run_id, pick.seed_models, registered, test), file=sys.stderr)
    if compact is not None:
        client.set_tag(parent_run_id, "compact.trial_number", str(compact.number))
        rule = f"smallest {cost_name(study)} within {config.compact_within} of the best {OBJECTIVE_METRIC}"
        client.set_tag(parent_run_id, "compact.rule", rule)
        register_compact(study, compact, registered, parent_run_id, config.register_name, data, data_ref, config.device)
    client.set_terminated(parent_run_id, "FINISHED")
    attributes.set_summarised_at(study, len(trials))  # last: a summary that failed halfway is redone
    return registered


def log_tables_and_plots(study: optuna.Study, parent_run_id: str, compact: FrozenTrial | None) -> None:
    """The leaderboard (CSV, HTML), Optuna's plots, and with ``compact`` the Pareto front."""
    board = trials_table(study)
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
        MlflowClient().log_artifacts(parent_run_id, tmp)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Every trial, best first: number, val_accuracy, state, parameters, seconds, attributes."""
    trials = study.trials_dataframe(attrs=("number", "value", "state", "params", "duration", "user_attrs"))
    trials = trials.rename(columns={"value": OBJECTIVE_METRIC, "values_0": OBJECTIVE_METRIC, "values_1": cost_name(study)})
    if "duration" in trials:
        trials["duration"] = trials["duration"].dt.total_seconds().round(1)
    return trials.sort_values(OBJECTIVE_METRIC, ascending=False, na_position="last")


def confirmed_pick(study: optuna.Study, runs: pd.DataFrame, job: WorkerJob) -> Pick:
    """From the confirmation's seed runs (experiments/confirm.py): the champion configuration's
    best seed run, with its configuration's mean and std."""
    config, step = job.config, len(counted(study.get_trials(deepcopy=False)))
    table = confirmation_table(study, runs)
    markdown = log_confirmation(job.parent_run_id, table, config.confirm_seeds, step=step)
    chosen, best = champion_run(runs, table), table.iloc[0]
    seed_models = runs[runs["trial"] == chosen.trial].sort_values("seed")
    print(f"confirmed over seeds 1 to {config.confirm_seeds}, best mean {OBJECTIVE_METRIC} first:\n{markdown}", file=sys.stderr)
    std = None if pd.isna(best["val_accuracy_std"]) else float(best["val_accuracy_std"])
    return Pick(
        study.trials[chosen.trial],
        chosen.run_id,
        chosen.model_uri,
        chosen.val_accuracy,
        chosen.seed,
        float(best["val_accuracy_mean"]),
        std,
        int(best["n_seeds"]),
        tuple((int(r.seed), r.model_uri) for r in seed_models.itertuples()),
    )


def register_best(
    study: optuna.Study,
    pick: Pick,
    parent_run_id: str,
    register_name: str,
    data: PreparedData,
    data_ref: str,
    device: str,
) -> Registered | None:
    """Register the model ``pick`` names, unless it already is; test it once; maybe crown it."""
    confirmed = {"val_accuracy_mean": pick.val_accuracy_mean, "val_accuracy_std": pick.val_accuracy_std, "n_seeds": pick.n_seeds}
    previous = attributes.registered(study)
    if previous and (previous["trial"], previous.get("seed"), previous["name"]) == (pick.trial.number, pick.seed, register_name):
        registered = Registered(**{**previous, **confirmed})  # the same model: nothing new to register or test
    else:
        made = register_trial(study, pick, parent_run_id, register_name, data, data_ref, device)
        if not made:
            return None
        version, test_accuracy = made
        why_not = crown_if_better(register_name, version, pick.val_accuracy, validation_data(data), pick.val_accuracy_mean)
        registered = Registered(
            register_name,
            version,
            pick.trial.number,
            pick.val_accuracy,
            test_accuracy,
            not why_not,
            why_not,
            pick.seed,
            **confirmed,
        )
    attributes.set_registered(study, asdict(registered))
    return registered


def register_compact(
    study: optuna.Study,
    compact: FrozenTrial,
    best: Registered | None,
    parent_run_id: str,
    register_name: str,
    data: PreparedData,
    data_ref: str,
    device: str,
) -> Registered | None:
    """Give the compact rule's pick the alias ``compact``: the best trial's version when it is the
    same trial's own model (tested once already), else its own version, registered and tested once."""
    previous = attributes.compact(study)
    if previous and previous["trial"] == compact.number and previous["name"] == register_name:
        registered = Registered(**previous)
    elif best and best.trial == compact.number and best.seed is None:
        registered = best
    else:
        made = register_trial(study, trial_pick(compact), parent_run_id, register_name, data, data_ref, device)
        if not made:
            return None
        version, test_accuracy = made
        registered = Registered(register_name, version, compact.number, compact.values[0], test_accuracy, False)
    MlflowClient().set_registered_model_alias(register_name, COMPACT, registered.version)
    attributes.set_compact(study, asdict(registered))
    return registered


def register_trial(
    study: optuna.Study,
    pick: Pick,
    parent_run_id: str,
    register_name: str,
    data: PreparedData,
    data_ref: str,
    device: str,
) -> tuple[str, float] | None:
    """Register the model ``pick`` names, with its lineage (``lineage_tags``), and test it once;
    its version and test_accuracy."""
    if not pick.model_uri:
        print(f"warning: trial {pick.trial.number} logged no model, so nothing is registered", file=sys.stderr)
        return None
    tags = lineage_tags(study, pick, data)
    version = str(mlflow.register_model(pick.model_uri, register_name, tags=tags).version)
    test_accuracy = test_once(f"models:/{register_name}/{version}", parent_run_id, data, data_ref, device)
    client = MlflowClient()
    client.set_model_version_tag(register_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    params = ", ".join(f"{name} {value}" for name, value in pick.trial.params.items())
    confirmed = ""
    if pick.seed is not None:
        spread = f" ± {pick.val_accuracy_std:.4f}" if pick.val_accuracy_std is not None else ""
        confirmed = (
            f", trained again with seed {pick.seed}: its configuration has the best mean {OBJECTIVE_METRIC} "
            f"over {pick.n_seeds} seeds ({pick.val_accuracy_mean:.4f}{spread}) of the study's best"
        )
    client.update_model_version(
        register_name,
        version,
        description=f"Study {study.study_name}, trial {pick.trial.number} ({params}){confirmed}: {OBJECTIVE_METRIC} "
        f"{pick.val_accuracy:.4f} on {data.manifest['dataset']} (validation split {tags[VAL_DIGEST_TAG][:12]}), "
        f"test_accuracy {test_accuracy:.4f} (tested once, after it was chosen). Trained in {tags['precision']}, "
        f"code {tags['code_version'][:12]}" + (f", git commit {tags['git_commit'][:12]}." if "git_commit" in tags else "."),
    )
    return version, test_accuracy


# Version tags that say what a version was validated on: only versions that agree on both compare.
DATASET_TAG, VAL_DIGEST_TAG = "data.dataset", "data.val_sha256"
MEAN_TAG = f"confirm.{OBJECTIVE_METRIC}_mean"  # a confirmed version's: its configuration's mean over seeds


def validation_data(data: PreparedData) -> dict[str, str]:
    return {DATASET_TAG: data.manifest["dataset"], VAL_DIGEST_TAG: data.manifest["splits"]["val"]["sha256"]}


def lineage_tags(study: optuna.Study, pick: Pick, data: PreparedData) -> dict[str, str]:
    """What a reviewer needs to trust a version: its data (dataset, each split's sha256), its study
    and trial, the trial's parameters, its validation score (and, confirmed, its seed and its
    configuration's mean over seeds), precision and code version."""
    from pipeline.main import code_version

    trial = pick.trial
    tags = {"optuna.study_name": study.study_name, "optuna.trial_number": str(trial.number)}
    tags[OBJECTIVE_METRIC] = f"{pick.val_accuracy:.6f}"
    if len(trial.values) > 1:
        cost = cost_name(study)
        tags[cost] = format_cost(cost, trial.values[1]).replace(",", "")  # a tag is read by programs: no separators
    if pick.seed is not None:
        tags.update({"confirm.seed": str(pick.seed), "confirm.n_seeds": str(pick.n_seeds)})
        tags[MEAN_TAG] = f"{pick.val_accuracy_mean:.6f}"
        if pick.val_accuracy_std is not None:
            tags[f"confirm.{OBJECTIVE_METRIC}_std"] = f"{pick.val_accuracy_std:.6f}"
    tags.update(validation_data(data))
    tags.update({f"data.{split}_sha256": data.manifest["splits"][split]["sha256"] for split in ("train", "test")})
    tags.update({f"param.{name}": str(value) for name, value in trial.params.items()})
    run = MlflowClient().get_run(pick.run_id) if pick.run_id else None
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
    classifier = serving.load(model_uri, torch_device)  # as users load and serve it
    experiment_id = MlflowClient().get_run(parent_run_id).info.experiment_id
    tags = {"pipeline.stage": "evaluate", "pipeline.model": model_uri, "pipeline.data": data_ref}
    with mlflow.start_run(
        run_name=f"evaluate {model_uri.removeprefix('models:/')}",
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        tags=tags,
    ):
        evaluation = evaluate_and_log(classifier, data, EvaluateConfig(device=device), torch_device, data_ref, model_uri)
    return evaluation.test_accuracy


def comparison(
    champion_tags: dict[str, str], val_accuracy: float, val_accuracy_mean: float | None
) -> tuple[float, float, str, str]:
    """How a new version is judged against the champion: (its score, the champion's, what they are,
    why). Means over seeds when both have one (the configuration was chosen by its mean: its best
    seed would flatter it), else each model's own val_accuracy."""
    if val_accuracy_mean is not None and MEAN_TAG in champion_tags:
        measure = f"mean {OBJECTIVE_METRIC} over seeds"
        return val_accuracy_mean, float(champion_tags[MEAN_TAG]), measure, "means compared: both were confirmed over seeds"
    how = "single models compared"
    if val_accuracy_mean is not None or MEAN_TAG in champion_tags:
        how += f": {'the champion' if val_accuracy_mean is not None else 'this one'} was not confirmed over seeds"
    return val_accuracy, float(champion_tags.get(OBJECTIVE_METRIC, "-1")), OBJECTIVE_METRIC, how


def crown_if_better(
    name: str, version: str, val_accuracy: float, validated_on: dict[str, str], val_accuracy_mean: float | None = None
) -> str:
    """Move the champion alias to ``version`` if the champion was validated on the same data
    (``validated_on``: dataset and validation split digest) and scores lower (``comparison``: the
    means over seeds when both have one, ``val_accuracy_mean`` and the champion's tag). Returns ""
    when it moved, else why not in one line, naming what was compared: a version validated on other
    data (another dataset, a smaller split) is registered, but never compared."""
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
        score, to_beat, measure, how = comparison(champion.tags, val_accuracy, val_accuracy_mean)
        if score <= to_beat:
            said = f"champion version {champion.version} has {measure} {to_beat:.4f} on the same data"
            return f"{said}, this one {score:.4f} ({how})"
    client.set_registered_model_alias(name, CHAMPION, version)
    return ""


def report(study: optuna.Study, registered: Registered | None, experiment_id: str, top: int = 5) -> str:
    """The lines a person reads at the end: the best trials as a table, the champion, and where to look."""
    board = trials_table(study)
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
        origin = f"trial {registered.trial}"
        if registered.seed is not None:
            spread = f" ± {registered.val_accuracy_std:.4f}" if registered.val_accuracy_std is not None else ""
            origin += (
                f"'s configuration, seed {registered.seed} (mean {OBJECTIVE_METRIC} {registered.val_accuracy_mean:.4f}"
                f"{spread} over {registered.n_seeds} seeds)"
            )
        lines.append(
            f"registered {registered.name} version {registered.version} from {origin}: "
            f"{OBJECTIVE_METRIC} {registered.val_accuracy:.4f}, test_accuracy {registered.test_accuracy:.4f}; {role}"
        )
    if compact := attributes.compact(study):
        lines.append(
            f"alias {COMPACT}: {compact['name']} version {compact['version']} from trial {compact['trial']}: "
            f"{OBJECTIVE_METRIC} {compact['val_accuracy']:.4f}, test_accuracy {compact['test_accuracy']:.4f}"
        )
    lines.append(f"see the trials: {ui_link(experiment_id)}")
    return "\n".join(lines)
