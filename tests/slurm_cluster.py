"""A real one-node Slurm (Debian's slurm-wlm: slurmctld + slurmd, munge) on 127.0.0.1, in one directory.

Used by tests/test_slurm.py (fixture ``slurm_cluster`` there); also runnable by hand::

    python -m tests.slurm_cluster DIR      # starts it, prints `export SLURM_CONF=...`, Ctrl-C stops it

Everything lives under DIR: slurm.conf, the munge key and socket, slurmctld's state, slurmd's spool, pid files
and logs. The daemons run in the foreground (``-D``/``-F``) as children of this process, so :meth:`stop`
ends exactly what :meth:`start` started (and :meth:`start` stops what it started if it fails midway). Only
loopback: both Slurm ports are free ports on 127.0.0.1, the node's address is 127.0.0.1. No cgroups
(proctrack/linuxproc, task/none), no accounting database (so no ``sacct``; finished jobs stay in
``scontrol show job`` for MinJobAge and are written to the jobcomp/filetxt file, :meth:`completed_jobs`).
The Slurm commands find this cluster through ``SLURM_CONF`` (:attr:`env`; :meth:`start` leaves it unset in
``os.environ`` unless asked to set it).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

# the node is this host, by name (a job's SLURM_NODELIST must resolve: Lightning's rendezvous address)
NODE = socket.gethostname().split(".")[0]
PARTITION = "cpu"
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmError(RuntimeError):
    pass


def missing_commands() -> list[str]:
    """The slurm-wlm / munge programs that are not installed (`make slurm` installs them)."""
    progs = ["munged", "munge", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo"]
    return [p for p in progs if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so a killed test run leaves no daemon behind; :meth:`SlurmCluster.stop` is the normal way."""
    import ctypes
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


class SlurmCluster:
    """One node (``cpus`` CPUs), one partition, munge authentication, all state under ``root``."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 4096):
        self.root = Path(root).absolute()
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.jobcomp = self.root / "log" / "jobcomp.txt"
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.node = NODE
        self.partition = PARTITION

    # -----------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for the Slurm commands (and whatever runs them, e.g. NeMo-Run's local tunnel)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        host = socket.gethostname().split(".")[0]
        r = self.root
        self.conf.write_text(f"""\
# written by tests/slurm_cluster.py: one node on 127.0.0.1, everything under {r}
ClusterName=fundcomment
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in this container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
# quick turnaround for tests (defaults: 30 s kill wait)
KillWait=5
SchedulerParameters=sched_interval=2
NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True, preexec_fn=_die_with_parent)

    def _wait(self, what: str, check, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if check():
                return
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise SlurmError(f"Slurm on {self.root}: {what} did not happen within {timeout:.0f} s"
                                 + (f" (exited: {dead})" if dead else "") + "\n" + self.log_tail())
            time.sleep(0.3)

    def run(self, *argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """A Slurm command against this cluster (``scontrol``, ``squeue``, ``sbatch`` ...)."""
        r = subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SlurmError(f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}")
        return r

    def start(self) -> "SlurmCluster":
        missing = missing_commands()
        if missing:
            raise SlurmError(f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge; "
                             "or `make slurm`)")
        self._write_config()
        try:
            m = self.root / "munge"
            self._spawn("munged", [_exe("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                                   f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                                   f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
            self._wait("munged's socket", self.munge_socket.exists, 30)
            self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-f", str(self.conf)])
            self._wait("slurmctld answering `scontrol ping`",
                       lambda: "UP" in self.run("scontrol", "ping", check=False).stdout, 60)
            self._spawn("slurmd", [_exe("slurmd"), "-D", "-f", str(self.conf), "-N", NODE])
            self._wait(f"node {NODE} idle", lambda: self.node_state() == "idle", 60)
        except BaseException:
            self.stop()
            raise
        return self

    def node_state(self) -> str:
        r = self.run("sinfo", "-h", "-n", NODE, "-o", "%T", check=False)
        return r.stdout.strip()

    def stop(self) -> None:
        """Cancel what still runs, then end the daemons this object started (slurmd, slurmctld, munged)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--partition", PARTITION, check=False, timeout=10)
            except (OSError, subprocess.SubprocessError):
                pass
        for name in reversed(DAEMONS):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            try:
                os.killpg(p.pid, signal.SIGTERM)  # its own session: the daemon and anything it forked
            except ProcessLookupError:
                pass
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        self._kill_job_steps()
        for f in self._logs:
            f.close()
        self._logs.clear()

    def _kill_job_steps(self) -> None:
        """slurmstepd processes of jobs (each started by slurmd in its own session) still alive: killed."""
        for pid_dir in Path("/proc").glob("[0-9]*"):
            try:
                cmd = (pid_dir / "cmdline").read_bytes().split(b"\0")
                env = (pid_dir / "environ").read_bytes()
            except OSError:
                continue
            if cmd and cmd[0].endswith(b"slurmstepd") and f"SLURM_CONF={self.conf}".encode() in env:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -----------------------------------------------------------------------------------------
    def log_tail(self, n: int = 3000) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace")
            if text.strip():
                parts.append(f"--- {f.name}\n{text[-n:]}")
        return "\n".join(parts)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o ID`` as a dict (JobState, ExitCode, Reason, StdOut, ...); {} once it is purged."""
        r = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if r.returncode != 0:
            return {}
        out = {}
        for item in r.stdout.split():
            k, sep, v = item.partition("=")
            if sep:
                out.setdefault(k, v)
        return out

    def completed_jobs(self) -> list[dict[str, str]]:
        """The jobcomp/filetxt records (one per finished job: JobId, JobState, ExitCode, ...)."""
        if not self.jobcomp.is_file():
            return []
        rows = []
        for line in self.jobcomp.read_text().splitlines():
            rows.append(dict(item.partition("=")[::2] for item in line.split() if "=" in item))
        return rows

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise SlurmError(f"job {job_id} not in {states} after {timeout:.0f} s: {info}\n{self.log_tail()}")
            time.sleep(1)


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m tests.slurm_cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="directory for config, state, spool, logs and the munge key (created)")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args(argv)
    cluster = SlurmCluster(Path(args.dir), cpus=args.cpus)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))  # stop on SIGTERM too
    with cluster:
        print(f"export SLURM_CONF={cluster.conf}   # partition {PARTITION}, node {NODE}; Ctrl-C stops it", flush=True)
        try:
            while all(p.poll() is None for p in cluster.procs.values()):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
