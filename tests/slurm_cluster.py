"""A real SLURM cluster for tests: munged, slurmctld and one slurmd per node, on this machine.

The configuration follows what was measured to work on these machines (shared/LOCAL_SERVICES.md):
state, spool, pid and log files live in a temporary folder, and clients find the controller
through ``SLURM_CONF``. Daemons are stopped by PID.

One node: the node is this host (``hostname -s``) on 127.0.0.1. Two nodes: the second node lives in
a network namespace of its own (``ip netns``), joined to this one by a veth pair named ``ptv`` at
both ends (so ``GLOO_SOCKET_IFNAME=ptv`` is right on either node, as a cluster profile names its
fabric); the nodes are ``ptnode1`` (this namespace, 10.201.0.1) and ``ptnode2`` (10.201.0.2), each a
slurmd started with ``-N``; the second is entered with ``nsenter --net`` only (``ip netns exec`` would
also remount /sys, where slurmd needs the host's cgroup tree). The namespace and the link are
deleted by :meth:`stop`.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time

from pretrain.dist import free_port

NETNS, LINK, SUBNET = "pretrain-ptnode2", "ptv", "10.201.0"


MUNGE_SOCKET = "/run/munge/munge.socket.2"
MUNGE_USERS = "/run/munge/pretrain-test-clusters"
"""One file per test cluster using munged: two clusters may run at once (pytest-xdist workers), and munged,
if a test cluster started it, is stopped only when the last of them stops."""


@contextlib.contextmanager
def _munge_lock():
    os.makedirs(MUNGE_USERS, exist_ok=True)
    with open(os.path.join(MUNGE_USERS, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def use_munge(user: str) -> None:
    """Start munged unless it runs (as user munge; the package made its key) and count ``user`` as using it."""
    os.makedirs("/run/munge", exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    with _munge_lock():
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
            open(os.path.join(MUNGE_USERS, ".started"), "w").close()
        _wait_for(lambda: os.path.exists(MUNGE_SOCKET), f"munged's socket {MUNGE_SOCKET}")
        open(os.path.join(MUNGE_USERS, user), "w").close()


def release_munge(user: str) -> None:
    """``user`` no longer needs munged; the last user stops it if a test cluster started it."""
    with _munge_lock():
        try:
            os.remove(os.path.join(MUNGE_USERS, user))
        except FileNotFoundError:
            pass
        started = os.path.join(MUNGE_USERS, ".started")
        if not [name for name in os.listdir(MUNGE_USERS) if not name.startswith(".")] and os.path.exists(started):
            subprocess.run(["pkill", "-x", "munged"])
            _wait_for(lambda: subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0,
                      "munged to exit")  # still in the lock: a cluster starting now must not find it dying
            os.remove(started)


def _wait_for(done, what: str, seconds: float = 20.0) -> None:
    deadline = time.time() + seconds
    while not done():
        if time.time() > deadline:
            raise RuntimeError(f"waited {seconds:g} s for {what}")
        time.sleep(0.1)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def make_second_node_network() -> None:
    """The namespace of node 2 and the veth pair to it (an earlier run's leftovers removed first)."""
    remove_second_node_network()
    if f" {SUBNET}." in _ip("-o", "addr").stdout:
        raise RuntimeError(f"{SUBNET}.0/24 is in use on this machine: the 2-node test cluster needs it free")
    _ip("netns", "add", NETNS)
    _ip("link", "add", LINK, "type", "veth", "peer", "name", LINK + "2")
    _ip("link", "set", LINK + "2", "netns", NETNS)
    _ip("-n", NETNS, "link", "set", LINK + "2", "name", LINK)
    _ip("addr", "add", f"{SUBNET}.1/24", "dev", LINK)
    _ip("-n", NETNS, "addr", "add", f"{SUBNET}.2/24", "dev", LINK)
    for where in ([], ["-n", NETNS]):
        _ip(*where, "link", "set", LINK, "up")
    _ip("-n", NETNS, "link", "set", "lo", "up")


def remove_second_node_network() -> None:
    _ip("link", "del", LINK, check=False)
    _ip("netns", "del", NETNS, check=False)


class SlurmCluster:
    """Start with :meth:`start`, stop with :meth:`stop`; ``env`` is what clients need (SLURM_CONF).
    ``nodes``: 1 (this host) or 2 (see the module's docstring), ``cpus`` each."""

    def __init__(self, root: str, cpus: int = 2, nodes: int = 1):
        if nodes not in (1, 2):
            raise ValueError("a test cluster has 1 or 2 nodes")
        self.root, self.cpus = root, cpus
        self.conf = os.path.join(root, "slurm.conf")
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        host = socket.gethostname().split(".")[0]
        self.nodes = [(host, "127.0.0.1")] if nodes == 1 else [(f"ptnode{i}", f"{SUBNET}.{i}") for i in (1, 2)]
        self.pid_files = {"slurmctld": os.path.join(root, "slurmctld.pid"),
                          **{name: os.path.join(root, f"slurmd-{name}.pid") for name, _ in self.nodes}}
        self.munge_user = f"{os.getpid()}-{os.path.basename(root)}"

    def write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        for folder in ("state", *(f"spool-{name}" for name, _ in self.nodes)):
            os.makedirs(os.path.join(self.root, folder), exist_ok=True)
        lines = [
            "ClusterName=pretraintest", f"SlurmctldHost={host}({self.nodes[0][1]})", "SlurmUser=root",
            "AuthType=auth/munge", "MpiDefault=none", "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={self.root}/jobcomp.txt", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool-%n",
            f"SlurmctldPidFile={self.pid_files['slurmctld']}", f"SlurmdPidFile={self.root}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root}/slurmctld.log", f"SlurmdLogFile={self.root}/slurmd-%n.log",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "MinJobAge=600", "KillWait=10",
            *(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus} RealMemory=2000 State=UNKNOWN"
              for name, addr in self.nodes),
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as handle:
            handle.write("\n".join(lines) + "\n")

    def start(self) -> "SlurmCluster":
        if len(self.nodes) > 1:
            make_second_node_network()
        self.write_conf()
        use_munge(self.munge_user)
        subprocess.run(["slurmctld", "-i"], env=self.env, check=True)
        if len(self.nodes) == 1:
            subprocess.run(["slurmd"], env=self.env, check=True)
        else:
            subprocess.run(["slurmd", "-N", self.nodes[0][0]], env=self.env, check=True)
            subprocess.run(["nsenter", f"--net=/run/netns/{NETNS}", "slurmd", "-N", self.nodes[1][0]], env=self.env,
                           check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.stdout.split() == ["idle"] * len(self.nodes):
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM nodes not idle after 60 s; see {self.root}/slurmctld.log and slurmd-*.log")

    def stop(self) -> None:
        for name, path in self.pid_files.items():
            if os.path.isfile(path):
                try:
                    os.kill(int(open(path).read().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        release_munge(self.munge_user)
        if len(self.nodes) > 1:
            time.sleep(1)  # slurmd out of the namespace before it goes
            remove_second_node_network()

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


@contextlib.contextmanager
def running_cluster(root: str, **kwargs):
    """A started :class:`SlurmCluster` (``kwargs``: its settings) with ``SLURM_CONF`` exported to this process
    while it runs; stopped, and the variable restored, after."""
    cluster = SlurmCluster(root, **kwargs).start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.conf
    try:
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
