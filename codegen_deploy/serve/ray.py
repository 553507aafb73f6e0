"""The same app as a Ray Serve deployment: replicas (and autoscaling) on a Ray cluster, one GPU each where the
cluster has GPUs.

    codegen-serve EXPORT --ray --replicas 2                  # a local Ray, 2 replicas behind one HTTP port
    RAY_ADDRESS=auto codegen-serve EXPORT --ray --replicas 1 --max-replicas 4   # an existing cluster

Each replica builds the FastAPI app of serve/app.py when it starts (serve.ingress with a late-bound app),
so it opens its own session and batcher; Ray's proxy spreads requests over the replicas.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import sys

import psutil

from ..errors import InputError, MissingDependencyError
from .app import ServeSettings, create_app


class CodegenReplica:
    """One Ray Serve replica: the codegen-serve app over its own session."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        if os.environ.get(_LOOPBACK_ENV) == "1":
            _replica_grpc_on_loopback()

    def __serve_build_asgi_app__(self):
        return create_app(self.settings)


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise MissingDependencyError('ray is not installed: pip install "codegen-deploy[ray]"') from e
    return ray, serve


def build_deployment(
    settings: ServeSettings,
    replicas: int = 1,
    max_replicas: int | None = None,
    replica_cpus: float = 1.0,
    replica_gpus: float = 0.0,
):
    """The bound Ray Serve application: `replicas` replicas, or autoscaling from `replicas` to `max_replicas`
    on ongoing requests (a replica is busy at max_batch of them)."""
    _, serve = _import_ray()
    if max_replicas is not None and max_replicas < replicas:
        raise InputError(f"--max-replicas {max_replicas} is below --replicas {replicas}: raise it or leave it out")
    scaling = (
        {
            "autoscaling_config": {
                "min_replicas": replicas,
                "max_replicas": max_replicas,
                "target_ongoing_requests": settings.max_batch,
            }
        }
        if max_replicas is not None
        else {"num_replicas": replicas}
    )
    deployment = serve.deployment(serve.ingress()(CodegenReplica), name="codegen")
    return deployment.options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=settings.max_batch + settings.max_queue,
        graceful_shutdown_timeout_s=settings.shutdown_grace,  # a stopping replica's wait for its requests
        **scaling,
    ).bind(settings)


def serve_with_ray(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_replicas: int | None = None,
    replica_cpus: float = 1.0,
    replica_gpus: float | None = None,
    node_ip: str = "127.0.0.1",
) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, run the deployment behind host:port, block until
    interrupted or terminated, then shut Serve down. Returns the exit code of the stop: 130 (SIGINT) or 143
    (SIGTERM).

    A local Ray's own services (GCS, raylets, workers, agents) listen on `node_ip`: by default the loopback
    address, so that only this machine reaches them; the machine's address lets other nodes join."""
    local = not os.environ.get("RAY_ADDRESS")
    if local and _is_loopback_ip(node_ip):
        # Ray's own switch (as on macOS and Windows): its node address is the loopback one, which Ray would
        # otherwise replace by the machine's outward address, even when given as _node_ip_address. Ray's
        # processes inherit the environment: the replicas see _LOOPBACK_ENV too.
        os.environ[_LOCAL_ONLY_ENV] = "0"
        os.environ[_LOOPBACK_ENV] = "1"
    ray, serve = _import_ray()
    stopped_by = signal.SIGINT

    def stop(signum, frame):
        nonlocal stopped_by
        stopped_by = signum
        raise KeyboardInterrupt

    options = {"include_dashboard": False, "configure_logging": False}
    if local:
        options["object_store_memory"] = 256 * 1024 * 1024  # requests and answers are small
        if not _is_loopback_ip(node_ip):
            options["_node_ip_address"] = node_ip
    if os.environ.get("PYTHONPATH"):
        options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    ray.init(**options)
    if local:
        where = "127.0.0.1 only (this machine)" if _is_loopback_ip(node_ip) else node_ip
        print(f"codegen-serve: the local Ray's own services listen on {where} (--ray-node-ip)", file=sys.stderr)
    # After ray.init, whose own handler would end this process at once: SIGTERM shuts Serve and Ray down.
    signal.signal(signal.SIGTERM, stop)
    try:
        if replica_gpus is None:
            replica_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        app = build_deployment(settings, replicas, max_replicas, replica_cpus, replica_gpus)
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="codegen", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # a second one does not cut the shutdown short
        started = psutil.Process().children(recursive=True) if local else []
        serve.shutdown()
        ray.shutdown()
        _stop_leftovers(started)
    return 128 + stopped_by


# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray takes the loopback address as its node address (ray_constants.py).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Set for the replicas of a local Ray kept to this machine.
_LOOPBACK_ENV = "CODEGEN_SERVE_RAY_LOOPBACK"


def _replica_grpc_on_loopback() -> None:
    """Ray Serve binds each replica's inter-deployment gRPC server to [::]:0, every interface, whatever the
    node's address (ray/serve/_private/replica.py, when the replica has built its app, i.e. after this runs):
    on a local Ray kept to this machine, bind it to the loopback address, where the node's proxy reaches it."""
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    add_port = getattr(replica, "add_port_to_grpc_server", None)
    if add_port is None or getattr(add_port, "loopback", False):
        return

    def add_loopback_port(server, address: str):
        return add_port(server, "127.0.0.1:0" if address == "[::]:0" else address)

    add_loopback_port.loopback = True
    replica.add_port_to_grpc_server = add_loopback_port


def _is_loopback_ip(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _stop_leftovers(processes, timeout: float = 5.0) -> None:
    """Stop the local Ray's processes that outlive ray.shutdown() (its node agents can, when they miss their
    parent's exit): they were started by this process, so they end with it."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
