"""Training across processes (hosts) on JAX's own distributed runtime.

Every process runs the same command; `jax.distributed.initialize` connects them through a
coordinator that process 0 hosts, after which `jax.devices()` lists every process's devices and
hrm_jax.parallel builds one mesh over them. `resolve` decides where the cluster comes from, setting
by setting, first match wins:

1. explicit values (the CLI flags `--coordinator HOST:PORT --num-processes N --process-id I`);
2. the environment: HRM_COORDINATOR, HRM_NUM_PROCESSES, HRM_PROCESS_ID (and jax's own
   JAX_COORDINATOR_ADDRESS for the address);
3. a SLURM job step with more than one task: the settings still unknown are left to
   jax.distributed.initialize, which reads them from SLURM itself (the first node of
   SLURM_STEP_NODELIST, a port derived from SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID, and one
   device per process, SLURM_LOCALID).

Nothing set (or one process): None, a plain single-process run. `initialize` must run before any
other use of jax (it fixes which devices the process sees). A process that cannot join within
`coordinator_timeout` exits with one line saying which side is missing; once joined, a process that
stops sending heartbeats for `heartbeat_timeout` seconds (killed, crashed, its machine lost) makes the
runtime terminate every other process, so a dead peer never leaves the rest blocked in a collective.

The helpers below are what the training loop needs to stay in step: `is_primary` (process 0 writes
logs and files), `barrier`, and `agree_any` (a decision any process may trigger, e.g. a stop signal
that reached one terminal, taken by all at the same step). CPU collectives across processes go
through gloo, jax's default for `jax_cpu_collectives_implementation` on every supported version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "HRM_COORDINATOR"
ENV_NUM_PROCESSES = "HRM_NUM_PROCESSES"
ENV_PROCESS_ID = "HRM_PROCESS_ID"
JAX_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
# The variables jax's SLURM detection needs (jax/_src/clusters/slurm_cluster.py, is_env_present).
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# jax's own connect timeout is set this much later than ours, so that our message comes first.
_JAX_TIMEOUT_MARGIN_S = 15


class DistributedError(ValueError):
    """A cluster setting that is missing, malformed or unreachable; the message says what to change."""


def _field(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """The settings a user gives for a multi-process run (the CLI flags); None: from the environment or SLURM."""

    coordinator: str | None = _field(None, f"HOST:PORT where process 0 hosts the coordinator (else ${ENV_COORDINATOR}, "
                                           f"${JAX_ENV_COORDINATOR}, or SLURM's first node)")
    num_processes: int | None = _field(None, f"processes in the run, one per host or per GPU (else "
                                             f"${ENV_NUM_PROCESSES} or SLURM_NTASKS; 1: a single-process run)")
    process_id: int | None = _field(None, f"this process's index, 0 to num_processes - 1 (else ${ENV_PROCESS_ID} or "
                                          "SLURM_PROCID)")
    coordinator_timeout: float = _field(300.0, "seconds to wait until every process has joined (default 300)")
    heartbeat_timeout: int = _field(100, "seconds without a heartbeat after which a process counts as dead and every "
                                         "other process stops (default 100)")

    def __post_init__(self) -> None:
        if not self.coordinator_timeout > 0:
            raise DistributedError(f"coordinator_timeout={self.coordinator_timeout!r} must be a positive number of "
                                   "seconds (--coordinator-timeout)")
        if not (isinstance(self.heartbeat_timeout, int) and self.heartbeat_timeout >= 1):
            raise DistributedError(f"heartbeat_timeout={self.heartbeat_timeout!r} must be a whole number of seconds "
                                   ">= 1 (--heartbeat-timeout)")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A resolved multi-process setup. A None setting is left to jax's SLURM detection; `sources` says where
    each setting came from ("flag", an environment variable's name, or "slurm")."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    sources: Mapping[str, str]
    coordinator_timeout: float = 300.0
    heartbeat_timeout: int = 100

    def describe(self) -> str:
        return ", ".join(f"{name}={getattr(self, name) if getattr(self, name) is not None else '?'} "
                         f"({self.sources[name]})" for name in ("coordinator", "num_processes", "process_id"))


# Resolution ------------------------------------------------------------------------------------
_FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id"}
_ENV_NAMES = {"coordinator": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES, "process_id": ENV_PROCESS_ID}


def _int_setting(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{where}={text!r} is not an integer") from None


def _pick(name: str, value, env: Mapping[str, str], env_names: Sequence[str]):
    """(value, source) of one setting: the explicit value, else the first environment variable set."""
    if value is not None:
        return value, "flag"
    for env_name in env_names:
        if env.get(env_name, "") != "":
            text = env[env_name]
            return (text if name == "coordinator" else _int_setting(text, env_name)), env_name
    return None, None


def slurm_step(env: Mapping[str, str]) -> bool:
    """Inside a SLURM job step of several tasks (`srun` with -n > 1), as jax's SLURM detection sees it."""
    if not all(name in env for name in SLURM_VARIABLES):
        return False
    return _int_setting(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1


def _check_coordinator(address: str, source: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DistributedError(f"coordinator {address!r} (from {source}) is not HOST:PORT with a port from 1 to "
                               "65535, e.g. node0:12355 or localhost:12355")


def resolve(config: ClusterConfig = ClusterConfig(), env: Mapping[str, str] | None = None) -> Cluster | None:
    """The cluster this process belongs to (see the module docstring for the order), or None for one process."""
    env = os.environ if env is None else env
    picked = {"coordinator": _pick("coordinator", config.coordinator, env, (ENV_COORDINATOR, JAX_ENV_COORDINATOR)),
              "num_processes": _pick("num_processes", config.num_processes, env, (ENV_NUM_PROCESSES,)),
              "process_id": _pick("process_id", config.process_id, env, (ENV_PROCESS_ID,))}
    values = {name: value for name, (value, _) in picked.items()}
    sources = {name: source for name, (_, source) in picked.items()}
    slurm = slurm_step(env)
    if values["num_processes"] == 1 or (not slurm and all(v is None for v in values.values())):
        if values["process_id"] not in (None, 0):
            raise DistributedError(f"process_id={values['process_id']} (from {sources['process_id']}) with a single "
                                   "process: the only process id is 0")
        return None
    missing = [name for name, value in values.items() if value is None]
    if missing and not slurm:
        given = ", ".join(f"{name} (from {sources[name]})" for name in values if name not in missing)
        raise DistributedError(
            f"a multi-process run needs a coordinator, a process count and a process id; {given} given, "
            + " and ".join(f"{_FLAGS[name]} (or ${_ENV_NAMES[name]})" for name in missing)
            + " missing. Give all three on every process, or launch with SLURM's srun")
    _validate(values, sources)
    sources = {name: source or "slurm" for name, source in sources.items()}
    return Cluster(values["coordinator"], values["num_processes"], values["process_id"], sources,
                   coordinator_timeout=config.coordinator_timeout, heartbeat_timeout=config.heartbeat_timeout)


def _validate(values: dict, sources: dict) -> None:
    if values["coordinator"] is not None:
        _check_coordinator(values["coordinator"], sources["coordinator"])
    count, index = values["num_processes"], values["process_id"]
    if count is not None and count < 1:
        raise DistributedError(f"num_processes={count} (from {sources['num_processes']}) must be at least 1")
    if index is not None and (index < 0 or (count is not None and index >= count)):
        bound = f"0 to {count - 1}" if count is not None else "at least 0"
        raise DistributedError(f"process_id={index} (from {sources['process_id']}) must be {bound}: number the "
                               "processes 0, 1, ... with process 0 on the coordinator's host")


# Joining -----------------------------------------------------------------------------------------
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
            return True
    except OSError:
        return False


def join_failure(cluster: Cluster, waited_s: float) -> str:
    """The line printed when this process has not joined the cluster after `waited_s` seconds."""
    count = cluster.num_processes if cluster.num_processes is not None else "all"
    fix = "or raise --coordinator-timeout"
    if cluster.process_id == 0:
        return (f"only part of the {count} processes joined the coordinator at {cluster.coordinator} within "
                f"{waited_s:.0f} s: start the others with the same --coordinator and --num-processes (process ids 1 to "
                f"{'N-1' if cluster.num_processes is None else cluster.num_processes - 1}), {fix}")
    where = cluster.coordinator or "the address SLURM gives"
    if cluster.coordinator is not None and not _answers(cluster.coordinator):
        return (f"no coordinator answers at {where} after {waited_s:.0f} s: start process 0 (it hosts the "
                f"coordinator) on that host, check the address, the port and the firewall, {fix}")
    return (f"the coordinator at {where} answers but not all {count} processes joined within {waited_s:.0f} s: "
            f"start the missing ones with the same --coordinator and --num-processes, {fix}")


def initialize(cluster: Cluster) -> None:
    """Joins the cluster with jax.distributed.initialize; call it before any other use of jax.

    Raises DistributedError for a coordinator port already taken on process 0's host or jax already in
    use. A cluster that is not complete within cluster.coordinator_timeout ends this process with exit
    code 2 and one line (join_failure): jax's own timeout would abort it with a C++ stack trace, and
    the wait cannot be interrupted from Python, so a watchdog thread prints the line and exits first.
    """
    if cluster.process_id == 0 and cluster.coordinator is not None:
        port = int(cluster.coordinator.rpartition(":")[2])
        if not _port_free(port):
            raise DistributedError(f"port {port} is already in use on this host, so process 0 cannot host the "
                                   f"coordinator: choose another port in --coordinator, or stop what holds it")
    started = time.monotonic()

    def give_up() -> None:
        print(f"error: {join_failure(cluster, time.monotonic() - started)}", file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(cluster.coordinator_timeout, give_up)
    watchdog.daemon = True
    logger.info("joining a multi-process run: %s", cluster.describe())
    watchdog.start()
    try:
        jax.distributed.initialize(coordinator_address=cluster.coordinator, num_processes=cluster.num_processes,
                                   process_id=cluster.process_id,
                                   initialization_timeout=int(cluster.coordinator_timeout) + _JAX_TIMEOUT_MARGIN_S,
                                   heartbeat_timeout_seconds=cluster.heartbeat_timeout)
    except RuntimeError as err:
        raise DistributedError(f"jax.distributed.initialize failed ({str(err).splitlines()[0]}): join the cluster "
                               "(hrm_jax.distributed.initialize) before anything else uses jax") from None
    finally:
        watchdog.cancel()
    logger.info("process %d of %d joined in %.1f s; %d local and %d global devices", jax.process_index(),
                jax.process_count(), time.monotonic() - started, jax.local_device_count(), jax.device_count())


# Staying in step -------------------------------------------------------------------------------
def is_primary() -> bool:
    """Process 0: the one that writes logs, metrics, plots and checkpoint manifests."""
    return jax.process_index() == 0


def multi_process() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier of this name (nothing to wait for in one process)."""
    if multi_process():
        multihost_utils.sync_global_devices(name)


def agree_any(flags: Sequence[bool]) -> list[bool]:
    """Each flag raised on any process, as every process sees it: the same decisions everywhere."""
    if not multi_process():
        return [bool(f) for f in flags]
    gathered = multihost_utils.process_allgather(np.asarray(flags, dtype=bool))  # [processes, len(flags)]
    return [bool(v) for v in np.asarray(gathered).reshape(jax.process_count(), len(flags)).any(axis=0)]


def first_differing(settings: Mapping) -> int | None:
    """The first process whose `settings` (JSON-able) differ from process 0's, else None; compared by digest."""
    if not multi_process():
        return None
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).digest()
    gathered = np.asarray(multihost_utils.process_allgather(np.frombuffer(digest, dtype=np.uint8)))
    gathered = gathered.reshape(jax.process_count(), len(digest))
    differing = [p for p in range(len(gathered)) if not np.array_equal(gathered[p], gathered[0])]
    return differing[0] if differing else None
