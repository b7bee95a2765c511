"""A training of a study (a trial, or a confirmation run) in its MLflow run: its end state as tags,
and its checkpoint kept on the run, where the retry of a lost attempt resumes it.

Every epoch's checkpoint replaces the run's ``checkpoint/`` artifact, so it reaches every worker
through the tracking store, with no shared filesystem. A re-queued copy opens a run of its own,
tagged with the run it resumes, rather than reopening the old one: the worker of the earlier
attempt may still be alive (cut off from the database, not dead) and logging to it (docs/tuning.md).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial

from experiments import attributes
from experiments.job import WorkerJob, worker_id
from experiments.storage import DATABASE_ERRORS
from pipeline.checkpoints import Checkpoints
from pipeline.config import say
from pipeline.tracking import start_run_with_system_metrics, when_reachable
from pipeline.training import EpochMetrics, TrainingInterrupted

RESUMED_FROM_TAG = "optuna.resumed_from_run"  # on a retry's run: the earlier attempt's run it continues
WORKER_TAG = "optuna.worker"  # host:pid of the worker that trained the run

CHECKPOINT_ARTIFACT = "checkpoint"  # a run's newest checkpoint, replaced after every epoch
_CHECKPOINT_FILE = "latest.pt"


def upload_checkpoint(run_id: str, path: Path) -> bool:
    """Make ``path`` the run's checkpoint artifact, replacing the one before. A failed upload (the
    tracking server down) is said and skipped: the next epoch uploads again."""
    try:
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
            fixed = Path(tmp, _CHECKPOINT_FILE)  # one name: each upload overwrites the last
            shutil.copyfile(path, fixed)
            MlflowClient().log_artifact(run_id, str(fixed), CHECKPOINT_ARTIFACT)
        return True
    except (mlflow.exceptions.MlflowException, OSError) as error:
        say(f"warning: checkpoint of run {run_id} not uploaded ({type(error).__name__}: {error})")
        return False


def download_checkpoint(run_id: str, folder: Path) -> Path | None:
    """The run's checkpoint artifact, downloaded into ``folder`` (as the loop's oldest checkpoint
    name, so the loop resumes from it); None if the run has none."""
    try:
        if not MlflowClient().list_artifacts(run_id, CHECKPOINT_ARTIFACT):
            return None
        with tempfile.TemporaryDirectory(prefix="checkpoint-") as tmp:
            downloaded = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=f"{CHECKPOINT_ARTIFACT}/{_CHECKPOINT_FILE}", dst_path=tmp
            )
            folder.mkdir(parents=True, exist_ok=True)
            return Path(downloaded).replace(folder / "epoch-0000-from-run.pt")
    except (mlflow.exceptions.MlflowException, OSError) as error:
        say(f"warning: checkpoint of run {run_id} not read ({type(error).__name__}: {error})")
        return None


def earlier_runs(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> list[str]:
    """The runs of the attempts ``trial`` repeats (``retry_of``, then its own ``retry_of``...), newest first."""
    trials, runs = study.get_trials(deepcopy=False), []
    number = attributes.RETRY_OF.read(trial)
    while number is not None:
        if run_id := attributes.RUN_ID.read(trials[number]):
            runs.append(run_id)
        number = attributes.RETRY_OF.read(trials[number])
    return runs


class RunCheckpoints:
    """The local checkpoint folder of a training in ``run_id``: started from the newest checkpoint
    of ``earlier`` runs, each epoch's checkpoint uploaded to ``run_id``."""

    def __init__(self, folder: Path, run_id: str, earlier: list[str]):
        self.folder, self.run_id = folder, run_id
        self.resumed_from = next((run for run in earlier if download_checkpoint(run, folder)), None)
        if self.resumed_from:
            mlflow.set_tag(RESUMED_FROM_TAG, self.resumed_from)

    def restored(self) -> list[EpochMetrics]:
        """The epochs the checkpoint it starts from has behind it (none for a fresh start)."""
        saved = Checkpoints(self.folder).latest() if self.resumed_from else None
        return [EpochMetrics(**metrics) for metrics in saved["history"]] if saved else []

    def after_epoch(self, then: Callable[[EpochMetrics], None] | None = None) -> Callable[[EpochMetrics], None]:
        """The loop's per-epoch callback: upload the epoch's checkpoint, then ``then`` (which may prune)."""

        def on_epoch(metrics: EpochMetrics) -> None:
            upload_checkpoint(self.run_id, Checkpoints(self.folder).paths()[-1])
            if then:
                then(metrics)

        return on_epoch


@contextmanager
def training_run(trial: optuna.Trial, job: WorkerJob, name: str, tags: dict[str, str]) -> Iterator[RunCheckpoints]:
    """A training of ``trial`` (of the study, or of its queue) in a run of its own under the study's
    parent run, tagged with its worker (and GPU); one stopped by SIGINT or SIGTERM (a preemption)
    uploads its position inside the epoch in progress too. The run ends as its trial does: COMPLETE
    (FINISHED), PRUNED (KILLED), REQUEUED (KILLED: interrupted, cut off from its database, or given
    up by the other workers while cut off; a copy resumes it and only that run counts), FAIL (FAILED)."""
    tags = {"pipeline.data": job.data_ref, WORKER_TAG: worker_id(), **tags}
    if job.gpu is not None:
        tags["pipeline.cuda_visible_devices"] = job.gpu  # the machine's GPU; gpu_index counts within what the worker sees
    with start_run_with_system_metrics(
        run_name=name, experiment_id=job.experiment_id, parent_run_id=job.parent_run_id, tags=tags
    ) as run:
        attributes.RUN_ID.write(trial, run.info.run_id)
        with tempfile.TemporaryDirectory(prefix="checkpoints-") as folder:
            try:
                yield RunCheckpoints(Path(folder), run.info.run_id, earlier_runs(trial.study, trial))
            except optuna.TrialPruned as pruned:
                mlflow.set_tags({"optuna.trial_state": "PRUNED", "optuna.prune_reason": str(pruned)})
                mlflow.end_run("KILLED")
                raise
            except BaseException as error:
                if isinstance(error, TrainingInterrupted) and error.checkpoint:
                    upload_checkpoint(run.info.run_id, error.checkpoint)
                interrupted = isinstance(error, (KeyboardInterrupt, optuna.exceptions.UpdateFinishedTrialError, *DATABASE_ERRORS))
                state = "REQUEUED" if interrupted else "FAIL"
                mlflow.set_tags({"optuna.trial_state": state, "optuna.fail_reason": f"{type(error).__name__}: {error}"[:5000]})
                mlflow.end_run("KILLED" if interrupted else "FAILED")
                raise
        when_reachable(lambda: mlflow.set_tag("optuna.trial_state", "COMPLETE"), "the run's state")


def checkpoint_runs(study: optuna.Study, trial: optuna.Trial | FrozenTrial) -> list[str]:
    """The runs whose checkpoints ``trial``'s told result leaves unneeded: its own, and those of the attempts it repeats."""
    return list(filter(None, [attributes.RUN_ID.read(trial), *earlier_runs(study, trial)]))


def forget_checkpoints(run_ids: list[str]) -> None:
    """Remove the checkpoints of these runs (``checkpoint_runs``). MLflow's client has no call to delete
    an artifact: the run's artifact repository does it (local folders and the server's proxy)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    for run_id in run_ids:
        try:
            get_artifact_repository(MlflowClient().get_run(run_id).info.artifact_uri).delete_artifacts(CHECKPOINT_ARTIFACT)
        except (mlflow.exceptions.MlflowException, OSError, NotImplementedError) as error:
            say(f"warning: checkpoint of run {run_id} not removed ({type(error).__name__}: {error})")
