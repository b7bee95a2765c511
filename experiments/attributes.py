"""What a study and its trials carry in Optuna's storage besides parameters and values: every
attribute's name and what it holds, read and written through its ``Attribute`` (no other module
reads ``user_attrs`` or calls ``set_user_attr``). One an older study never recorded reads as its
default (``None`` unless stated).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.trial import FrozenTrial


@dataclass(frozen=True)
class Attribute:
    """One user attribute of a study or a trial (Optuna's ``user_attrs``)."""

    key: str
    default: Any = None

    def read(self, holder) -> Any:
        return holder.user_attrs.get(self.key, self.default)

    def write(self, holder, value) -> None:
        holder.set_user_attr(self.key, value)


# --- the study's attributes -----------------------------------------------------------------------

SETTINGS = Attribute("settings")  # what its trials must share: a rerun that asks for others is refused (tune.py)
PARENT_RUN = Attribute("mlflow_parent_run_id")  # the study's one MLflow parent run
DATA_CHECKSUMS = Attribute("data_sha256")  # the checksums of the train and val splits it tunes on
WARM_START = Attribute("warm_start", {})  # {"study", "trials": best first}: where its enqueued configurations came from
SUMMARISED_AT = Attribute("summarised_at")  # how many counted trials the last successful summary saw
REGISTERED = Attribute("registered")  # the version registered as its champion candidate (registry.Registered as a dict)
COMPACT_PICK = Attribute("compact")  # the version the compact rule picked (multi-objective studies)
CONFIRM_PLAN = Attribute("plan", {})  # on the companion study: {"at": round, "runs": [{"trial", "seed", "key"}, ...]}

# --- a trial's attributes -------------------------------------------------------------------------

RUN_ID = Attribute("mlflow_run_id")  # its child run
MODEL_URI = Attribute("model_uri")  # the model it logged, when it was the best so far
WORKER = Attribute("worker")  # host:pid of the worker that runs it: set once it holds the trial's lease (coordination.py)
RETRY_OF = Attribute("retry_of")  # on a re-queued trial: the number of the trial it repeats
REQUEUE_REASON = Attribute("requeue_reason")  # on a re-queued trial: why the original did not count
LOST_WORKERS = Attribute("lost_workers", 0)  # on a re-queued trial: how many workers its parameters have lost
WORK = Attribute("work", {})  # on a companion study's item: {"trial", "seed", "key", "at"} or {"summary": True, "at"}
NOT_RECORDED = "(not yet recorded)"


def requeued_copy(original: FrozenTrial, reason: str, lost: int) -> dict:
    """The attributes a re-queued copy of ``original`` is enqueued with (``study.enqueue_trial(user_attrs=...)``)."""
    copy = {RETRY_OF.key: original.number, REQUEUE_REASON.key: reason, LOST_WORKERS.key: lost}
    return copy | ({WORK.key: WORK.read(original)} if WORK.read(original) else {})


def enqueued_params(trial: FrozenTrial) -> dict:
    """The parameters a WAITING trial was enqueued with: Optuna keeps them in its system attribute
    ``fixed_params`` until a worker asks for the trial (its params are empty until then)."""
    return trial.system_attrs.get("fixed_params", {})
