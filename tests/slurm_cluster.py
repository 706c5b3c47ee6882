"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd on 127.0.0.1.

The configuration follows what was measured to work on these machines (shared/LOCAL_SERVICES.md):
the node is this host (``hostname -s``), state, spool, pid and log files live in a temporary
folder, and clients find the controller through ``SLURM_CONF``. Daemons are stopped by PID.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from pretrain.dist import free_port

class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is what clients need (SLURM_CONF)."""

    def __init__(self, root: str, cpus: int = 2):
        self.root = root
        self.cpus = cpus
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.pid_files = {name: os.path.join(root, f"{name}.pid") for name in ("slurmctld", "slurmd")}
        self.started_munge = False

    def write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for folder in ("state", "spool"):
            os.makedirs(os.path.join(self.root, folder), exist_ok=True)
        lines = [
            "ClusterName=pretraintest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "AuthType=auth/munge",
            "MpiDefault=none", "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.root}/jobcomp.txt", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}", f"SlurmdPidFile={self.pid_files['slurmd']}",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd.log",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "MinJobAge=600", "KillWait=10",
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def start(self) -> "SlurmCluster":
        self.write_conf()
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
            self.started_munge = True
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True)
        subprocess.run(["slurmd"], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM node not idle after 60 s; see {self.root}/slurmctld.log and slurmd.log")

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld"):
            path = self.pid_files[name]
            if os.path.isfile(path):
                try:
                    os.kill(int(open(path).read().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        if self.started_munge:
            subprocess.run(["pkill", "-x", "munged"])

    def job(self, job_id: str) -> dict:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, Restarts...)."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                             text=True)
        fields = {}
        for item in out.stdout.split():
            key, _, value = item.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout: float = 300) -> dict:
        """Poll the job until it is in one of ``states``; returns its fields."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")
