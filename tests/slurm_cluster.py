"""A real single-node Slurm (slurmctld + slurmd + munged) on this machine, for tests/test_slurm*.py.

Nothing is installed here: without Slurm, munge, root or the executor plugin the tests are skipped
with the reason (`.ci/run` installs them). The daemons run in the foreground as children of the test
process, with every configuration, state and log file in a temporary folder, and are stopped by
pid at the end of the session. The node offers two fake GPUs (GRES on /dev/null and /dev/zero), so rules that request
`gpu=1` are scheduled (two at a time) exactly as on a GPU cluster, and a policy trained on `training.devices: 2`
(its job asks for 2 GPUs) too. See ../shared/ENVIRONMENT.md.
One cluster per machine at a time (it uses munge's default socket and the host's name): the fixture
``slurm_cluster`` (conftest.py) holds a machine-wide lock while one runs.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def skip_reason() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"Slurm/munge not installed (missing {', '.join(missing)}); `apt-get install slurm-wlm munge`"
    if os.geteuid() != 0:
        return "starting slurmd and munged needs root"
    for module in ("snakemake_executor_plugin_slurm", "snakemake_executor_plugin_slurm_jobstep"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install -r requirements.txt)"
    try:
        import pwd

        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4000


def executable(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """munged, slurmctld and slurmd in the foreground, configured under ``root`` (a fresh folder)."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.host = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        # The default socket: in configless mode slurmd authenticates before it has a configuration,
        # so it cannot be told another one.
        self.munge_socket = Path("/run/munge/munge.socket.2")
        self.made_run_dir = False
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for d in ("state", "spool", "log", "munge"):
            (self.root / d).mkdir()
        cpus = os.cpu_count() or 2
        self.ctld_port = free_port()
        self.conf.write_text(f"""\
ClusterName=shapotest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmctldParameters=enable_configless
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=300
GresTypes=gpu
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={int(memory_mb() * 0.8)} Gres=gpu:2 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # Two fake GPUs: scheduling only (two character devices that are no GPU; slurmd counts the files)
        (self.root / "gres.conf").write_text(f"AutoDetect=off\nNodeName={self.host} Name=gpu File=/dev/null\n"
                                             f"NodeName={self.host} Name=gpu File=/dev/zero\n")

    def munge_works(self) -> bool:
        encoded = subprocess.run(["munge", "-n"], capture_output=True)
        return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout,
                                                          capture_output=True).returncode == 0

    def start(self) -> None:
        self.write_config()
        if not (self.munge_socket.exists() and self.munge_works()):  # else reuse the machine's munged
            self.start_munged()
        self.spawn([executable("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self.wait_for(lambda: self.query(["scontrol", "ping"]).returncode == 0, "slurmctld")
        # configless: slurmd fetches the configuration from slurmctld and points the jobs' SLURM_CONF
        # at its cached copy (a batch job does not inherit SLURM_CONF, and srun inside it needs one)
        self.spawn([executable("slurmd"), "-D", "--conf-server", f"127.0.0.1:{self.ctld_port}"], "slurmd")
        self.wait_for(lambda: re.search(r"\b(idle|mix)\b", self.query(["sinfo", "-h", "-o", "%T"]).stdout), "idle node")

    def start_munged(self) -> None:
        munge_dir = self.root / "munge"
        key = munge_dir / "munge.key"
        run_dir = self.munge_socket.parent
        if not run_dir.exists():
            run_dir.mkdir(parents=True)
            self.made_run_dir = True
        shutil.chown(run_dir, "munge", "munge")
        subprocess.run([executable("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(self.root, 0o755)
        shutil.chown(munge_dir, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        os.chmod(munge_dir, 0o700)
        os.chmod(key, 0o400)
        # munged refuses to run as root; started as the munge user it is still our child (its pid is ours)
        self.spawn([executable("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                    f"--key-file={key}", f"--pid-file={munge_dir}/munged.pid", f"--log-file={munge_dir}/munged.log",
                    f"--seed-file={munge_dir}/munged.seed"], "munged", user="munge")
        self.wait_for(self.munge_works, "munged")

    def spawn(self, cmd: list[str], name: str, user: str | None = None) -> None:
        with open(self.root / "log" / f"{name}.stdout", "w") as log:
            as_user = {"user": user, "group": user, "extra_groups": []} if user else {}
            self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True, **as_user))

    def query(self, cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=30)

    def wait_for(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a Slurm daemon exited while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in sorted((self.root / "log").glob("*"))
                         if f.is_file())

    def stop(self) -> None:
        """Stop the daemons this object started, by pid, newest first."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
        if self.made_run_dir:
            shutil.rmtree(self.munge_socket.parent, ignore_errors=True)
