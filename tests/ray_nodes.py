"""Local Ray clusters as users start them: `ray start --block` nodes on 127.0.0.1, each in its own
process group, so stopping one cluster stops only its own processes (`ray stop` would take down
every Ray on the machine)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(**extra: str) -> dict:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the drivers' loopback-only switch; `ray start` does without
    env.pop("RAY_ADDRESS", None)
    # Nodes and clients agree on no token auth unless `extra` says otherwise (a token file in
    # ~/.ray would otherwise switch a `ray start` head to token auth while the clients send none).
    env["RAY_AUTH_MODE"] = "disabled"
    env.pop("RAY_AUTH_TOKEN", None)
    env.update(extra)
    return env


def _ray_start(args: list[str], env: dict) -> subprocess.Popen:
    # Every agent port is free-picked: another local cluster may hold the defaults, and a node
    # whose agent cannot bind answers every job submission with "No available agent to submit job".
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    return subprocess.Popen(["ray", "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                             *agent_ports, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


@dataclass
class LocalCluster:
    """A head and worker nodes; `address` is the GCS address drivers join, `dashboard` the job API
    (None without a dashboard). Serialisable, so that another process can stop it."""

    address: str
    dashboard: str | None
    pgids: list[int] = field(default_factory=list)
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)  # this process's children, to reap

    @classmethod
    def start(cls, head_cpus: int, workers: list[dict], dashboard: bool = False, env: dict | None = None,
              timeout: float = 120) -> LocalCluster:
        """`workers`: one {"cpus": n, "gpus": m} per worker node (GPUs are declared, not checked)."""
        env = env or node_env()
        gcs = free_port()
        temp_dir = Path("/tmp") / f"ray-t{os.getpid()}-{gcs}"  # short: Ray's socket paths have a length limit
        head_args = ["--head", f"--port={gcs}", f"--num-cpus={head_cpus}", "--num-gpus=0", f"--temp-dir={temp_dir}"]
        dash = None
        if dashboard:
            dash = free_port()
            head_args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dash}"]
        else:
            head_args += ["--include-dashboard=false"]
        procs = [_ray_start(head_args, env)]
        cluster = cls(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}" if dash else None, [p.pid for p in procs], procs)
        try:
            cluster._wait(procs, 1, timeout, env)
            for w in workers:
                # the nodes share this host's session folder: a second log monitor would send every
                # worker's lines to the driver twice (one per monitor), so only the head's runs
                procs.append(_ray_start([f"--address=127.0.0.1:{gcs}", f"--num-cpus={w['cpus']}",
                                         f"--num-gpus={w.get('gpus', 0)}", "--include-log-monitor=False"], env))
                cluster.pgids.append(procs[-1].pid)  # procs is cluster._procs
            cluster._wait(procs, 1 + len(workers), timeout, env)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _wait(self, procs: list[subprocess.Popen], nodes: int, timeout: float, env: dict) -> None:
        """Until the GCS counts `nodes` alive nodes: one client process (with the nodes' `env`, so
        their token too) polls (this process may already be a driver of another cluster), this one
        watches the `ray start` processes."""
        code = ("import ray, sys, time; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
                "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]): time.sleep(0.2)")
        client = subprocess.Popen([sys.executable, "-c", code, self.address, str(nodes)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + timeout
        try:
            while client.poll() is None:
                dead = [p.args for p in procs if p.poll() is not None]
                assert not dead, f"ray start exited early: {dead[0]}"
                assert time.time() < deadline, f"{nodes} Ray node(s) not up within {timeout:.0f} s"
                time.sleep(0.2)
            assert client.returncode == 0, client.stderr.read()[-2000:]
        finally:
            if client.poll() is None:
                client.kill()

    def stop(self, grace: float = 10) -> None:
        """SIGTERM to every node's process group, SIGKILL to what is left after `grace` seconds
        (a test cluster holds nothing worth a longer goodbye)."""
        for pgid in reversed(self.pgids):
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        for p in self._procs:  # `ray start --block` returns once its node is down
            try:
                p.wait(max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for pgid in self.pgids:
            while time.time() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps({"address": self.address, "dashboard": self.dashboard, "pgids": self.pgids}))

    @classmethod
    def load(cls, path: Path) -> LocalCluster:
        return cls(**json.loads(path.read_text()))


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
