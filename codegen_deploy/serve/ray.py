"""The same app as a Ray Serve deployment: replicas (and autoscaling) on a Ray cluster, one GPU each where the
cluster has GPUs.

    codegen-serve EXPORT --ray --replicas 2                  # a local Ray, 2 replicas behind one HTTP port
    RAY_ADDRESS=auto codegen-serve EXPORT --ray --replicas 1 --max-replicas 4   # an existing cluster

Each replica builds the FastAPI app of serve/app.py when it starts (serve.ingress with a late-bound app),
so it opens its own session and batcher; Ray's proxy spreads requests over the replicas.
"""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

from ..errors import InputError, MissingDependencyError
from .app import ServeSettings, create_app


class CodegenReplica:
    """One Ray Serve replica: the codegen-serve app over its own session."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings

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
) -> None:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, run the deployment behind host:port, block until
    interrupted or terminated, then shut Serve down."""
    ray, serve = _import_ray()

    def stop(signum, frame):
        raise KeyboardInterrupt

    options = {"include_dashboard": False, "configure_logging": False}
    local = not os.environ.get("RAY_ADDRESS")
    if local:
        options["object_store_memory"] = 256 * 1024 * 1024  # requests and answers are small
    if os.environ.get("PYTHONPATH"):
        options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"]}}
    ray.init(**options)
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
        started = psutil.Process().children(recursive=True) if local else []
        serve.shutdown()
        ray.shutdown()
        _stop_leftovers(started)


def _stop_leftovers(processes, timeout: float = 5.0) -> None:
    """Stop the local Ray's processes that outlive ray.shutdown() (its node agents can, when they miss their
    parent's exit): they were started by this process, so they end with it."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
