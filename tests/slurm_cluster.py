"""A throwaway single-node SLURM (munged + slurmctld + slurmd) for tests/test_slurm.py.

Debian's Slurm 22.05 (packages slurm-wlm, munge) runs as root with a localhost slurm.conf and
no slurmdbd. The config must sit at /etc/slurm/slurm.conf: the Snakemake SLURM plugin removes
every SLURM_* variable (SLURM_CONF included) inside jobs, so srun there reads the default path.
Our slurm.conf carries MARKER; a slurm.conf without it belongs to somebody else and is never
touched. Daemons run in the foreground as our children and are stopped by PID, nothing else;
the munge key, /etc/slurm/slurm.conf and the state folder may stay behind (a rerun rewrites
them). A lock file serialises concurrent test sessions on one machine.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SLURM_CONF = Path("/etc/slurm/slurm.conf")
MARKER = "# written by m2otca-pipeline tests/slurm_cluster.py (safe to delete)"
PACKAGES = ("slurm-wlm", "munge")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sinfo", "squeue", "sbatch", "srun", "scontrol", "scancel", "munge", "unmunge")
PORTS = (6817, 6818)  # slurmctld, slurmd
LOCK = Path("/run/lock/m2otca-pipeline-test-slurm.lock")
MUNGE_DIRS = {Path("/run/munge"): 0o755, Path("/var/lib/munge"): 0o711, Path("/var/log/munge"): 0o700}
MUNGE_KEY = Path("/etc/munge/munge.key")
MUNGED_PID = Path("/run/munge/m2otca-pipeline-test-munged.pid")  # a folder the munge user can write


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (missing packages, not root, ports taken, foreign config)."""


def missing() -> list[str]:
    """Daemons and client commands that are not installed."""
    return [d for d, p in DAEMONS.items() if not os.access(p, os.X_OK)] + [c for c in CLIENTS if not shutil.which(c)]


def try_install(timeout: float = 600) -> str:
    """apt-get install the Debian packages (root only); returns a log of what happened."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "not root or no apt-get: cannot install " + " ".join(PACKAGES)
    env = {**clean_env(), "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends",
                 "-o", "Dpkg::Options::=--force-confold", *PACKAGES]):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "\n".join(log + [f"{' '.join(cmd)}: timed out"])
        log.append(f"{' '.join(cmd)} -> {r.returncode}\n{r.stderr[-1500:]}")
        if r.returncode:
            break
    return "\n".join(log)


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def clean_env() -> dict[str, str]:
    """The environment without SLURM_* (a test run inside a SLURM job must not leak its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def node_hardware() -> dict[str, int]:
    """`slurmd -C` of this machine: CPUs, Boards, SocketsPerBoard, CoresPerSocket, ThreadsPerCore, RealMemory."""
    out = subprocess.run([DAEMONS["slurmd"], "-C"], capture_output=True, text=True, timeout=30, env=clean_env()).stdout
    hw = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", out.splitlines()[0] if out else "")}
    if "CPUs" not in hw or "RealMemory" not in hw:
        raise SlurmUnavailable(f"cannot read the node's hardware from `slurmd -C`: {out!r}")
    return hw


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def munge_works() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
        if cred.returncode:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class SlurmCluster:
    """Single-node cluster whose state, spool and logs live in `root`."""

    root: Path
    partition: str = "debug"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    hardware: dict[str, int] = field(default_factory=dict)
    _lock: object = None

    @property
    def ctld_log(self) -> Path:
        return self.root / "slurmctld.log"

    @property
    def slurmd_log(self) -> Path:
        return self.root / "slurmd.log"

    # ---------------------------------------------------------------- set-up
    def _acquire_lock(self, timeout: float) -> None:
        LOCK.parent.mkdir(parents=True, exist_ok=True)
        fh = open(LOCK, "w")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = fh
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    fh.close()
                    raise SlurmUnavailable(f"another test session holds {LOCK} (a SLURM test is running)") from None
                time.sleep(1)

    def _check_machine(self, ports: bool = True) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("the SLURM test runs slurmd/slurmctld and must run as root")
        if miss := missing():
            raise SlurmUnavailable("not installed: " + ", ".join(miss))
        if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text(errors="replace"):
            raise SlurmUnavailable(f"{SLURM_CONF} exists and was not written by this test; not touching it")
        if ports and (busy := [p for p in PORTS if port_in_use(p)]):
            raise SlurmUnavailable(f"ports {busy} are in use: a Slurm (not ours) seems to be running")

    def _stop_stale(self) -> None:
        """Stop daemons left running by an earlier run of this test that was killed before its
        finalizer ran: found through the PID files our previous slurm.conf names, and only when
        that PID still runs the daemon's binary. Called under the lock."""
        if not SLURM_CONF.exists() or MARKER not in (text := SLURM_CONF.read_text(errors="replace")):
            return
        for name, key in (("slurmd", "SlurmdPidFile"), ("slurmctld", "SlurmctldPidFile"), ("munged", "# MungedPidFile")):
            m = re.search(rf"^{key}=(\S+)", text, re.M)
            try:
                pid = int(Path(m.group(1)).read_text().split()[0]) if m else 0
                exe = os.readlink(f"/proc/{pid}/exe") if pid > 0 else ""
            except (OSError, ValueError, IndexError):
                continue
            if exe != os.path.realpath(DAEMONS[name]):  # /usr/sbin/slurmctld -> slurmctld-wlm
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)

    def _write_conf(self) -> None:
        hw = self.hardware
        node = " ".join(f"{k}={hw[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket",
                                                   "ThreadsPerCore", "RealMemory") if k in hw)
        conf = f"""{MARKER}
# state/logs: {self.root}
# MungedPidFile={MUNGED_PID}
ClusterName=pipelinetest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
# the plugin's squeue status needs finished jobs kept >= 3x its first-check delay
MinJobAge=300
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.ctld_log}
SlurmdLogFile={self.slurmd_log}
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
        tmp = SLURM_CONF.with_suffix(".conf.tmp")
        tmp.write_text(conf)
        tmp.replace(SLURM_CONF)

    def _spawn(self, name: str, cmd: list[str], **kw) -> None:
        out = open(self.root / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=clean_env(), start_new_session=True, **kw)
        out.close()

    def _start_munge(self) -> None:
        if munge_works():  # a munged is already serving the default socket: use it, never stop it
            return
        import grp
        import pwd

        uid, gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        for d, mode in MUNGE_DIRS.items():
            d.mkdir(parents=True, exist_ok=True)
            os.chown(d, uid, gid)
            os.chmod(d, mode)
        if not MUNGE_KEY.exists():
            subprocess.run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)], check=True, capture_output=True)
            os.chown(MUNGE_KEY, uid, gid)
            os.chmod(MUNGE_KEY, 0o600)
        # --force: a munged killed earlier may have left its socket behind
        self._spawn("munged", [DAEMONS["munged"], "--foreground", "--force", f"--pid-file={MUNGED_PID}"],
                    user=uid, group=gid, extra_groups=[])
        self._wait("munged", munge_works, 20)

    def _wait(self, name: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            for n, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{n} exited with {p.returncode} while waiting for {name}:\n{self.diagnostics()}")
            time.sleep(0.3)
        raise RuntimeError(f"{name} not ready after {timeout:.0f} s:\n{self.diagnostics()}")

    def node_state(self) -> str:
        r = subprocess.run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%t"], capture_output=True, text=True,
                           timeout=10, env=clean_env())
        return r.stdout.strip() if r.returncode == 0 else ""

    def start(self, timeout: float = 60, lock_timeout: float = 600) -> SlurmCluster:
        self._check_machine(ports=False)
        self._acquire_lock(lock_timeout)
        try:
            self._stop_stale()
            self._check_machine()  # again, under the lock
            self.hardware = node_hardware()
            for d in ("state", "spool"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
            self._write_conf()
            self._start_munge()
            self._spawn("slurmctld", [DAEMONS["slurmctld"], "-D", "-c", "-i"])
            self._wait("slurmctld", lambda: port_in_use(PORTS[0]), timeout)
            self._spawn("slurmd", [DAEMONS["slurmd"], "-D", "-N", "localhost"])
            self._wait("node idle", lambda: self.node_state() == "idle", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------- tear-down
    def stop(self) -> None:
        """Cancel our cluster's jobs, then stop the daemons we started (by PID), newest first."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            ids = self.squeue_ids()
            if ids:
                subprocess.run(["scancel", *ids], capture_output=True, timeout=15, env=clean_env())
                deadline = time.monotonic() + 20
                while self.squeue_ids() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def squeue_ids(self) -> list[str]:
        """Pending/running job ids of this cluster."""
        r = subprocess.run(["squeue", "-h", "-o", "%i", "-t", "PD,R,CG,CF,S"], capture_output=True, text=True,
                           timeout=10, env=clean_env())
        return r.stdout.split() if r.returncode == 0 else []

    # ---------------------------------------------------------------- checks
    def completed_jobs(self) -> dict[int, int]:
        """{job id: exit status} of every job slurmctld logged as complete (`_job_complete`)."""
        text = self.ctld_log.read_text(errors="replace") if self.ctld_log.exists() else ""
        return {int(j): int(s) for j, s in re.findall(r"_job_complete: JobId=(\d+) WEXITSTATUS (\d+)", text)}

    def job_state(self, job_id: int) -> str:
        r = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, timeout=10,
                           env=clean_env())
        return r.stdout

    def diagnostics(self) -> str:
        parts = []
        for f in sorted(self.root.glob("*.log")) + sorted(self.root.glob("*.out")):
            parts.append(f"--- {f.name} (tail)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)
