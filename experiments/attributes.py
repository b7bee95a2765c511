"""What a study and its trials carry in Optuna's storage besides parameters and values: every
attribute's name, what it holds, and the one function that reads or writes it.

Every module of ``experiments/`` goes through these; no other reads ``user_attrs`` or calls
``set_user_attr``. A reader of an older study finds ``None`` (or the stated default) for an
attribute that study never recorded.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

# --- the study's attributes -----------------------------------------------------------------------

SETTINGS_ATTR = "settings"  # what its trials must share: a rerun that asks for others is refused (tune.py)
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # the study's one MLflow parent run
DATA_ATTR = "data_sha256"  # the checksums of the train and val splits it tunes on
WARM_START_ATTR = "warm_start"  # {"study", "trials"}: where its enqueued configurations came from (warm_start.py)
SUMMARISED_ATTR = "summarised_at"  # how many counted trials the last successful summary saw
REGISTERED_ATTR = "registered"  # the version registered as its champion candidate (registry.Registered as a dict)
COMPACT_ATTR = "compact"  # the version the compact rule picked (multi-objective studies)
PLAN_ATTR = "plan"  # on the companion study: {"at": round, "runs": [{"trial", "seed", "key"}, ...]} (confirm.py)


def settings(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(SETTINGS_ATTR)


def set_settings(study: optuna.Study, value: dict) -> None:
    study.set_user_attr(SETTINGS_ATTR, value)


def parent_run(study: optuna.Study) -> str | None:
    return study.user_attrs.get(PARENT_RUN_ATTR)


def set_parent_run(study: optuna.Study, run_id: str) -> None:
    study.set_user_attr(PARENT_RUN_ATTR, run_id)


def data_checksums(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(DATA_ATTR)


def set_data_checksums(study: optuna.Study, sha256: dict) -> None:
    study.set_user_attr(DATA_ATTR, sha256)


def warm_start_of(study: optuna.Study) -> dict:
    """``{"study": name, "trials": [numbers, best first]}``, or ``{}`` for a study not warm-started."""
    return study.user_attrs.get(WARM_START_ATTR, {})


def set_warm_start(study: optuna.Study, source: str, trials: list[int]) -> None:
    study.set_user_attr(WARM_START_ATTR, {"study": source, "trials": trials})


def summarised_at(study: optuna.Study) -> int | None:
    return study.user_attrs.get(SUMMARISED_ATTR)


def set_summarised_at(study: optuna.Study, counted: int) -> None:
    study.set_user_attr(SUMMARISED_ATTR, counted)


def registered(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(REGISTERED_ATTR)


def set_registered(study: optuna.Study, version: dict) -> None:
    study.set_user_attr(REGISTERED_ATTR, version)


def compact(study: optuna.Study) -> dict | None:
    return study.user_attrs.get(COMPACT_ATTR)


def set_compact(study: optuna.Study, version: dict) -> None:
    study.set_user_attr(COMPACT_ATTR, version)


def confirm_plan(queue: optuna.Study) -> dict | None:
    return queue.user_attrs.get(PLAN_ATTR)


def set_confirm_plan(queue: optuna.Study, value: dict) -> None:
    queue.set_user_attr(PLAN_ATTR, value)


# --- a trial's attributes -------------------------------------------------------------------------

MLFLOW_RUN_ATTR = "mlflow_run_id"  # its child run
MODEL_URI_ATTR = "model_uri"  # the model it logged, when it was the best so far
WORKER_ATTR = "worker"  # host:pid of the worker that runs it: set while it holds the study lock (coordination.py)
RETRY_OF_ATTR = "retry_of"  # on a re-queued trial: the number of the trial it repeats
REQUEUE_REASON_ATTR = "requeue_reason"  # on a re-queued trial: why the original did not count
LOST_WORKERS_ATTR = "lost_workers"  # on a re-queued trial: how many workers its parameters have lost
WORK_ATTR = "work"  # on a companion study's item: {"trial", "seed", "key", "at"} or {"summary": True, "at"}
NOT_RECORDED = "(not yet recorded)"


def run_id(trial: FrozenTrial | optuna.Trial) -> str | None:
    return trial.user_attrs.get(MLFLOW_RUN_ATTR)


def set_run_id(trial: optuna.Trial, value: str) -> None:
    trial.set_user_attr(MLFLOW_RUN_ATTR, value)


def model_uri(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(MODEL_URI_ATTR)


def set_model_uri(trial: optuna.Trial, value: str) -> None:
    trial.set_user_attr(MODEL_URI_ATTR, value)


def worker(trial: FrozenTrial) -> str | None:
    """host:pid of its worker; None until the worker took the trial's lease."""
    return trial.user_attrs.get(WORKER_ATTR)


def set_worker(trial: optuna.Trial, worker_id: str) -> None:
    trial.set_user_attr(WORKER_ATTR, worker_id)


def retry_of(trial: FrozenTrial) -> int | None:
    return trial.user_attrs.get(RETRY_OF_ATTR)


def requeue_reason(trial: FrozenTrial) -> str | None:
    return trial.user_attrs.get(REQUEUE_REASON_ATTR)


def lost_workers(trial: FrozenTrial) -> int:
    return trial.user_attrs.get(LOST_WORKERS_ATTR, 0)


def requeued_copy(original: FrozenTrial, reason: str, lost: int) -> dict:
    """The attributes a re-queued copy of ``original`` is enqueued with (``study.enqueue_trial(user_attrs=...)``)."""
    copy = {RETRY_OF_ATTR: original.number, REQUEUE_REASON_ATTR: reason, LOST_WORKERS_ATTR: lost}
    return copy | ({WORK_ATTR: work(original)} if work(original) else {})


def work(trial: FrozenTrial | optuna.Trial) -> dict:
    """What a companion study's item is (experiments/confirm.py); ``{}`` for a trial of a study."""
    return trial.user_attrs.get(WORK_ATTR, {})


def enqueued_params(trial: FrozenTrial) -> dict:
    """The parameters a WAITING trial was enqueued with: Optuna keeps them in its system attribute
    ``fixed_params`` until a worker asks for the trial (its params are empty until then)."""
    return trial.system_attrs.get("fixed_params", {})
