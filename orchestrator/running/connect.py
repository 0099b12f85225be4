"""Connect to Ray: a cluster at an address, or a local Ray bound to 127.0.0.1 only.

Light on purpose (ray, no torch): ``normlab submit`` starts Ray while a thread imports the
rest of the driver and sets up tracking. Every worker of the job warms up as it starts
(``warmup``). ``orchestrator.running.rayenv`` prepares the environment, token
authentication included, before ray is imported.
"""

from __future__ import annotations

import os

import ray

from orchestrator.running.rayenv import check_ray_head
from orchestrator.running.warmup import DATASETS_ENV

_connected: str | None = None  # where init_ray connected this process, for later callers
LOCAL = "local (127.0.0.1 only)"


# Ray's dashboard process asks cloud-metadata addresses (169.254.169.254,
# metadata.google.internal) which cloud it runs on, whatever the usage-stats setting. For
# a local Ray those requests go to a dead proxy on loopback instead; workers get the
# user's own proxy settings back through the runtime environment.
_PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
_LOOPBACK_PROXY = {
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost,::1",
    "NO_PROXY": "127.0.0.1,localhost,::1",
}


def init_ray(address: str | None, *, num_cpus: int | None = None, datasets: tuple[str, ...] = ()) -> str:
    """Connect to the cluster at ``address``, or start a local Ray bound to 127.0.0.1 only.

    Every worker of this job imports what a trial needs as it starts (``warmup``; ``datasets``:
    the search's datasets, whose loaders' modules it imports too). Returns a description of
    where the search runs. (``orchestrator.running.rayenv`` prepares the environment, token
    authentication included, before ray is imported.)
    """
    global _connected
    if ray.is_initialized():
        return _connected or "already connected"
    address = address or os.environ.get("RAY_ADDRESS")  # e.g. inside `ray job submit`
    from orchestrator.tracking.target import credentials_env

    secrets = credentials_env()  # tracking credentials reach trials through Ray, never through storage
    warm_up = {"worker_process_setup_hook": "orchestrator.running.warmup.warm_up"}
    env_vars = {**secrets, DATASETS_ENV: ",".join(datasets)}
    if address:
        check_ray_head(address)
        ray.init(address=address, logging_level="WARNING", runtime_env={"env_vars": env_vars, **warm_up})
        _connected = address
        return address
    user_proxies = {k: os.environ.get(k, "") for k in _PROXY_VARS}
    os.environ.update(_LOOPBACK_PROXY)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            logging_level="WARNING",
            runtime_env={"env_vars": {**user_proxies, **env_vars}, **warm_up},
            # Ray would start one idle worker per CPU as this driver connects; none of them
            # can run a trial (Tune's actors have a runtime_env of their own), and their
            # start costs 2-3 s of CPU while the driver and Ray start
            _system_config={"prestart_worker_first_driver": False},
        )
    finally:
        for key, value in user_proxies.items():
            if value:
                os.environ[key] = value
            else:
                os.environ.pop(key, None)
    _connected = LOCAL
    return _connected


def started_local_ray() -> bool:
    """Whether this process started the Ray it is connected to (a local Ray, not a cluster's)."""
    return ray.is_initialized() and _connected == LOCAL


def end_local_ray() -> int:
    """End the local Ray this process started, at once: SIGKILL to every process it runs.

    Ray's graceful ``ray.shutdown()`` (SIGTERM, then a wait for each process in turn) took
    1.1-1.4 s here, a large part of a small search. Ending the process alone is not enough:
    the kernel kills Ray's own processes with it (``PR_SET_PDEATHSIG``), but the raylet's
    dashboard and runtime-env agents, orphaned, stay for another 60 s, holding the agent's
    port (52365), so the next local Ray's raylet waits ~5 s for an agent that cannot bind.
    Everything this process started is Ray's (its workers, agents, GCS, raylet; the search
    is over, its results written), so every descendant is killed. Returns how many.
    """
    if not started_local_ray():
        return 0
    import psutil  # Ray's own dependency, importable once ray is

    killed = 0
    for proc in psutil.Process().children(recursive=True):
        try:
            proc.kill()
            killed += 1
        except psutil.Error:  # already gone
            pass
    return killed
