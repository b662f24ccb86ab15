"""A real Slurm cluster on this machine, for tests: Debian's slurmctld and slurmd, one or several
emulated nodes, everything under one temporary directory.

    cluster = LocalSlurm(tmp_dir, nodes=2)
    cluster.start()              # slurm.conf written, daemons up, every node idle
    cluster.run(["sinfo"])       # clients find the cluster through SLURM_CONF
    cluster.stop()               # jobs cancelled, daemons shut down and reaped

By hand: `python tests/integration/slurm_cluster.py up DIR [--nodes N]` starts one and prints the
`export SLURM_CONF=...` line for your shell; `... down DIR` stops it.

No munge and no systemd: `auth/none` + `cred/none`, `proctrack/linuxproc`, `task/none`, no
accounting (FACTS.md, "Slurm, for real, on these machines"). Emulated nodes are several slurmd on
this host, each with its own name and port; Slurm calls them node1, node2, ... and reaches all of
them at 127.0.0.1. Must run as root (jobs run as the submitting user, and slurmd must be able to
start them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")


def missing_requirement() -> str | None:
    """Why a local cluster cannot run here, or None when it can."""
    for program in DAEMONS + CLIENTS:
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install slurmctld slurmd slurm-client)"
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts jobs as their user)"
    return None


def _real_memory_mib() -> int:
    """What slurmd -C reports; a node may not claim more (it would be drained)."""
    output = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    for word in output.split():
        if word.startswith("RealMemory="):
            return int(word.split("=", 1)[1])
    raise RuntimeError(f"slurmd -C printed no RealMemory: {output!r}")


class LocalSlurm:
    def __init__(self, root: Path, nodes: int = 1, cpus_per_node: int | None = None) -> None:
        if nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {nodes}")
        self.root = Path(root).resolve()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self._daemons: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ clients
    @property
    def env(self) -> dict[str, str]:
        """This process's environment pointed at the cluster (add it to subprocess environments)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, command: list[str], check: bool = True, timeout: float = 60, env: dict[str, str] | None = None):
        result = subprocess.run(command, env={**(env or self.env), "SLURM_CONF": str(self.conf)},
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}: {result.stderr.strip()}")
        return result

    def job_field(self, job_id: str, field: str) -> str | None:
        """One field of `scontrol show job` (JobState, Restarts, ExitCode...); None once Slurm forgot the job."""
        result = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        for word in result.stdout.split():
            key, _, value = word.partition("=")
            if key == field:
                return value
        return None

    # ------------------------------------------------------------------ daemons
    def write_config(self) -> None:
        for sub in ("state", "log", "run", *(f"spool/{node}" for node in self.nodes)):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        from conftest import free_ports  # tests/ is on the path under pytest, and below when run by hand

        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        memory = max(256, _real_memory_mib() // len(self.nodes) - 512)
        host = socket.gethostname()
        lines = [
            "ClusterName=moegpt-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/none",
            # A requeued job may start again only after its step credentials expire (default 120 s).
            "AuthInfo=cred_expire=5",
            # Look at the queue every second (default 60 s): a requeued job restarts as soon as it may.
            "SchedulerParameters=sched_interval=1",
            "CredType=cred/none",
            "SlurmUser=root",
            "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            # Finished jobs leave the controller after 5 s: `sbatch --wait` and squeue see the end quickly.
            "MinJobAge=5",
            # A job told to stop (scancel, time limit) gets SIGTERM, and SIGKILL this many seconds later.
            "KillWait=30",
            "InactiveLimit=0",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool' / '%n'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd-%n.log'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd-%n.pid'}",
        ]
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory={memory} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start(self, timeout: float = 60) -> None:
        reason = missing_requirement()
        if reason:
            raise RuntimeError(reason)
        self.write_config()
        log = open(self.root / "log" / "daemons.out", "ab")
        env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # -D: in the foreground, so they are our children: we stop and reap them ourselves.
        self._daemons.append(subprocess.Popen(["slurmctld", "-D", "-c", "-f", str(self.conf)], env=env,
                                              stdout=log, stderr=log, start_new_session=True))
        for node in self.nodes:
            self._daemons.append(subprocess.Popen(["slurmd", "-D", "-f", str(self.conf), "-N", node], env=env,
                                                  stdout=log, stderr=log, start_new_session=True))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [d for d in self._daemons if d.poll() is not None]
            if dead:
                self.stop()
                raise RuntimeError(f"{dead[0].args[0]} exited {dead[0].returncode}; see {self.root / 'log'}")
            states = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False).stdout.split()
            if states.count("idle") == len(self.nodes):
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local Slurm cluster did not become idle in {timeout:.0f} s; see {self.root / 'log'}")

    def stop(self, timeout: float = 30) -> None:
        """Cancel every job, shut the daemons down, reap them. Safe to call twice, and after a failed start."""
        if not self._daemons:
            return
        if self._daemons[0].poll() is None:
            jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if jobs:
                self.run(["scancel", "--signal=KILL", "--full", *jobs], check=False)
                self.run(["scancel", *jobs], check=False)
                self._wait_for_no_jobs(timeout / 2)
            self.run(["scontrol", "shutdown"], check=False)
        deadline = time.monotonic() + timeout
        for daemon in self._daemons:
            try:
                daemon.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()
        self._daemons.clear()

    def _wait_for_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split():
                return
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start or stop a local Slurm cluster (root, Debian packages).")
    parser.add_argument("action", choices=("up", "down"))
    parser.add_argument("directory", type=Path, help="where slurm.conf, state, spool and logs go")
    parser.add_argument("--nodes", type=int, default=1)
    args = parser.parse_args(argv)
    cluster = LocalSlurm(args.directory, nodes=args.nodes)
    if args.action == "up":
        cluster.start()
        # The daemons outlive this command: forget them so that nothing stops them on exit.
        cluster._daemons.clear()
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    env = {**os.environ, "SLURM_CONF": str(cluster.conf)}
    jobs = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True).stdout.split()
    if jobs:
        subprocess.run(["scancel", *jobs], env=env)
    result = subprocess.run(["scontrol", "shutdown"], env=env)
    return result.returncode


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest
    sys.exit(main())
