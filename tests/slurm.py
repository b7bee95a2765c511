"""A one-node Slurm cluster on loopback for a test: slurmctld and slurmd with their own slurm.conf,
state, spool, logs and pid files under the test's tmp folder, stopped afterwards.

The node has 3 fake GPUs (device nodes made with mknod, aliases of /dev/null), so ``--gres=gpu:1``
is scheduled as written and each task gets its own CUDA_VISIBLE_DEVICES; torch finds no CUDA
behind them and trains on the CPU. Loaded as a plugin by tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.infra import free_port, log_tail

MISSING_SLURM = "Slurm daemons (slurmctld, slurmd) not found: run `bash setup.sh --tests`, which installs Debian's slurm-wlm"
GPUS = 3

CONF = """\
ClusterName=test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
GresTypes=gpu
# one CPU a task: as many CPUs as GPUs, whatever this machine has
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs={gpus} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass(frozen=True)
class Slurm:
    """A running cluster: ``env`` holds SLURM_CONF for its commands (sbatch, squeue, scancel, scontrol)."""

    folder: Path
    env: dict[str, str]

    def __call__(self, *command: str) -> str:
        """Run a Slurm command against this cluster; its stdout."""
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}\n{self.logs()}"
        return done.stdout

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{log_tail(self.folder / name)}" for name in ("slurmctld.log", "slurmd.log"))

    def jobs(self) -> list[str]:
        return self("squeue", "--noheader", "--format=%i").split()


@pytest.fixture
def slurm(tmp_path) -> Iterator[Slurm]:
    """A one-node cluster with 3 fake GPUs, started for the test (about 1 s) and stopped after it."""
    if not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        pytest.fail(MISSING_SLURM, pytrace=False)  # CI must not pass by skipping
    if os.geteuid() != 0:
        pytest.fail("a local Slurm needs root: slurmd starts every job's processes", pytrace=False)
    folder = tmp_path / "slurm"
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True)
    for i in range(GPUS):  # gres.conf wants character devices; the index in the name is the task's CUDA_VISIBLE_DEVICES
        os.mknod(folder / f"nvidia{i}", 0o600 | 0o020000, os.makedev(1, 3))
    host = socket.gethostname().split(".")[0]
    conf = CONF.format(host=host, ctld_port=free_port(), d_port=free_port(), tmp=folder, gpus=GPUS)
    (folder / "slurm.conf").write_text(conf)
    (folder / "gres.conf").write_text(f"AutoDetect=off\nNodeName={host} Name=gpu File={folder}/nvidia[0-{GPUS - 1}]\n")
    cluster = Slurm(folder, {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")})
    sbin = Path(shutil.which("slurmctld") or "/usr/sbin/slurmctld").parent
    try:
        subprocess.run([sbin / "slurmctld", "-i"], env=cluster.env, check=True, timeout=30)
        subprocess.run([sbin / "slurmd"], env=cluster.env, check=True, timeout=30)
        deadline = time.monotonic() + 30
        while cluster("sinfo", "--noheader", "--format=%T").strip() != "idle":
            assert time.monotonic() < deadline, f"the node never became idle\n{cluster.logs()}"
            time.sleep(0.2)
        yield cluster
    finally:
        stop(cluster)


def stop(cluster: Slurm) -> None:
    """Cancel what still runs (SIGTERM, then SIGKILL after KillWait), then stop the daemons."""
    env = cluster.env
    subprocess.run(["scancel", "--user=root"], env=env, capture_output=True, timeout=30)
    deadline = time.monotonic() + 45  # KillWait (30 s) and a margin
    while (
        time.monotonic() < deadline
        and subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True, timeout=30).stdout.strip()
    ):
        time.sleep(0.5)
    subprocess.run(["scontrol", "shutdown"], env=env, capture_output=True, timeout=30)
    for name in ("slurmctld.pid", "slurmd.pid"):
        pid_file = cluster.folder / name
        if not pid_file.exists():
            continue
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
