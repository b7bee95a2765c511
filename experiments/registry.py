"""The model registry: a study's pick registered with its lineage (``lineage_tags``), tested once
on the registered artifact after it was chosen, and made champion when validation on the same data
says so (``crown_if_better``; docs/tuning.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import mlflow
import optuna
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from experiments import attributes
from experiments.job import WorkerJob
from experiments.pareto import COMPACT, cost_name, format_cost
from experiments.studies import OBJECTIVE_METRIC
from pipeline import serving
from pipeline.config import EvaluateConfig, say
from pipeline.data import PreparedData
from pipeline.evaluate import evaluate_and_log
from pipeline.numerics import resolve_device
from pipeline.tables import plus_minus

CHAMPION = "champion"
# Version tags that say what a version was validated on: only versions that agree on both compare.
DATASET_TAG, VAL_DIGEST_TAG = "data.dataset", "data.val_sha256"
MEAN_TAG = f"confirm.{OBJECTIVE_METRIC}_mean"  # a confirmed version's: its configuration's mean over seeds


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

    def over_seeds(self) -> dict:
        """Its configuration's results over seeds, as ``Registered`` records them."""
        return {"val_accuracy_mean": self.val_accuracy_mean, "val_accuracy_std": self.val_accuracy_std, "n_seeds": self.n_seeds}


def trial_pick(trial: FrozenTrial) -> Pick:
    """The model a trial logged itself (when it was the best so far)."""
    return Pick(trial, attributes.RUN_ID.read(trial), attributes.MODEL_URI.read(trial), trial.values[0])


def model_name(register_name: str, dataset: str) -> str:
    """The registered model a study's versions go to: ``auto`` is ``lstm-<dataset>``."""
    return f"lstm-{dataset}" if register_name == "auto" else register_name


def register_best(study: optuna.Study, pick: Pick, job: WorkerJob, data: PreparedData) -> Registered | None:
    """Register the model ``pick`` names, unless it already is; test it once; maybe crown it."""
    register_name = job.config.register_name
    previous = attributes.REGISTERED.read(study)
    if previous and (previous["trial"], previous.get("seed"), previous["name"]) == (pick.trial.number, pick.seed, register_name):
        registered = Registered(**{**previous, **pick.over_seeds()})  # the same model: nothing new to register or test
    elif made := register_trial(study, pick, job, data):
        why_not = crown_if_better(register_name, made.version, pick.val_accuracy, validation_data(data), pick.val_accuracy_mean)
        registered = replace(made, champion=not why_not, why_not_champion=why_not)
    else:
        return None
    attributes.REGISTERED.write(study, asdict(registered))
    return registered


def register_compact(
    study: optuna.Study, compact: FrozenTrial, best: Registered | None, job: WorkerJob, data: PreparedData
) -> Registered | None:
    """Give the compact rule's pick the alias ``compact``: the best trial's version when it is the
    same trial's own model (tested once already), else its own version, registered and tested once."""
    register_name = job.config.register_name
    previous = attributes.COMPACT_PICK.read(study)
    if previous and previous["trial"] == compact.number and previous["name"] == register_name:
        registered = Registered(**previous)
    elif best and best.trial == compact.number and best.seed is None:
        registered = best
    elif not (registered := register_trial(study, trial_pick(compact), job, data)):
        return None
    MlflowClient().set_registered_model_alias(register_name, COMPACT, registered.version)
    attributes.COMPACT_PICK.write(study, asdict(registered))
    return registered


def register_trial(study: optuna.Study, pick: Pick, job: WorkerJob, data: PreparedData) -> Registered | None:
    """Register ``pick``'s model with its lineage (``lineage_tags``) and test it once; not (yet) the champion."""
    register_name = job.config.register_name
    if not pick.model_uri:
        say(f"warning: trial {pick.trial.number} logged no model, so nothing is registered")
        return None
    tags = lineage_tags(study, pick, data)
    version = str(mlflow.register_model(pick.model_uri, register_name, tags=tags).version)
    test_accuracy = test_once(f"models:/{register_name}/{version}", job, data)
    client = MlflowClient()
    client.set_model_version_tag(register_name, version, "test_accuracy", f"{test_accuracy:.6f}")
    params = ", ".join(f"{name} {value}" for name, value in pick.trial.params.items())
    confirmed = ""
    if pick.seed is not None:
        confirmed = (
            f", trained again with seed {pick.seed}: its configuration has the best mean {OBJECTIVE_METRIC} "
            f"over {pick.n_seeds} seeds ({plus_minus(pick.val_accuracy_mean, pick.val_accuracy_std)}) of the study's best"
        )
    client.update_model_version(
        register_name,
        version,
        description=f"Study {study.study_name}, trial {pick.trial.number} ({params}){confirmed}: {OBJECTIVE_METRIC} "
        f"{pick.val_accuracy:.4f} on {data.manifest['dataset']} (validation split {tags[VAL_DIGEST_TAG][:12]}), "
        f"test_accuracy {test_accuracy:.4f} (tested once, after it was chosen). Trained in {tags['precision']}, "
        f"code {tags['code_version'][:12]}" + (f", git commit {tags['git_commit'][:12]}." if "git_commit" in tags else "."),
    )
    trial = pick.trial.number
    return Registered(register_name, version, trial, pick.val_accuracy, test_accuracy, False, "", pick.seed, **pick.over_seeds())


def validation_data(data: PreparedData) -> dict[str, str]:
    return {DATASET_TAG: data.manifest["dataset"], VAL_DIGEST_TAG: data.manifest["splits"]["val"]["sha256"]}


def lineage_tags(study: optuna.Study, pick: Pick, data: PreparedData) -> dict[str, str]:
    """What a reviewer needs to trust a version: its data (dataset, each split's sha256), study, trial
    and parameters, validation score (confirmed: seed and mean over seeds), precision and code version."""
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
    client = MlflowClient()
    run = client.get_run(pick.run_id) if pick.run_id else None
    tags["precision"] = run.data.params.get("resolved_precision", "unknown") if run else "unknown"
    tags["code_version"] = code_version()
    parent_id = run and run.data.tags.get("mlflow.parentRunId")
    if parent_id and (commit := client.get_run(parent_id).data.tags.get("mlflow.source.git.commit")):  # `mlflow run` records it
        tags["git_commit"] = commit
    return tags


def test_once(model_uri: str, job: WorkerJob, data: PreparedData) -> float:
    """Evaluate the registered artifact on the test set, in an evaluate run under the study's parent."""
    device = resolve_device(job.config.device)
    classifier = serving.load(model_uri, device)  # as users load and serve it
    with mlflow.start_run(
        run_name=f"evaluate {model_uri.removeprefix('models:/')}",
        experiment_id=job.experiment_id,
        parent_run_id=job.parent_run_id,
        tags={"pipeline.stage": "evaluate", "pipeline.model": model_uri, "pipeline.data": job.data_ref},
    ):
        config = EvaluateConfig(device=job.config.device)
        return evaluate_and_log(classifier, data, config, device, job.data_ref, model_uri).test_accuracy


def champion_version(name: str) -> ModelVersion | None:
    """The version of registered model ``name`` that holds the champion alias; None before one does."""
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None


def crown_if_better(
    name: str, version: str, val_accuracy: float, validated_on: dict[str, str], val_accuracy_mean: float | None = None
) -> str:
    """Move the champion alias to ``version`` if the champion, validated on the same data
    (``validated_on``), scores lower: by the means over seeds when both have one (its best seed
    would flatter a configuration chosen by its mean), else by each model's own val_accuracy.
    Returns "" when it moved, else why not in one line."""
    if champion := champion_version(name):
        differs = [f"{k} {champion.tags.get(k, 'unrecorded')[:16]}" for k, v in validated_on.items() if champion.tags.get(k) != v]
        if differs:
            return (
                f"not compared with champion version {champion.version}, validated on other data ({', '.join(differs)}); "
                "move the alias by hand if this one should serve"
            )
        if val_accuracy_mean is not None and MEAN_TAG in champion.tags:
            score, to_beat, measure = val_accuracy_mean, float(champion.tags[MEAN_TAG]), f"mean {OBJECTIVE_METRIC} over seeds"
            how = "means compared: both were confirmed over seeds"
        else:
            score, to_beat, measure = val_accuracy, float(champion.tags.get(OBJECTIVE_METRIC, "-1")), OBJECTIVE_METRIC
            how = "single models compared"
            if val_accuracy_mean is not None or MEAN_TAG in champion.tags:
                how += f": {'the champion' if val_accuracy_mean is not None else 'this one'} was not confirmed over seeds"
        if score <= to_beat:
            said = f"champion version {champion.version} has {measure} {to_beat:.4f} on the same data"
            return f"{said}, this one {score:.4f} ({how})"
    MlflowClient().set_registered_model_alias(name, CHAMPION, version)
    return ""
