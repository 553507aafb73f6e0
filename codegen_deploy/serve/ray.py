"""The same app as a Ray Serve deployment: replicas (and autoscaling) on a Ray cluster, one GPU each where the
cluster has GPUs.

    codegen-serve EXPORT --ray --replicas 2                  # a local Ray, 2 replicas behind one HTTP port
    RAY_ADDRESS=auto codegen-serve EXPORT --ray --replicas 1 --max-replicas 4   # an existing cluster

Each model replica (CodegenReplica) builds the FastAPI app of serve/app.py when it starts and runs its lifespan,
so it opens its own session and batcher. In front of them, one light ingress replica (CodegenIngress, no model)
takes the HTTP requests from Ray's proxy, reads each body and hands it on through a DeploymentHandle whose router
(routing.PrefixAffinityRouter) sends it to the model replica most likely to hold its prompt's prefix in its
prefix cache: Ray's proxy passes a replica only the ASGI scope, the body comes later, so a router between the
proxy and the model replicas could never see a prompt (routing.py says more).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import os
import signal
import sys
from typing import TYPE_CHECKING

import psutil

from ..errors import InputError, MissingDependencyError
from .app import ServeSettings, _answer, authorized, bearer_key, create_app
from .schemas import error_body

if TYPE_CHECKING:
    # routing.py imports Ray, which reads its environment when first imported: serve_with_ray sets that first,
    # so this module imports routing.py only where it runs (build_deployment, the replicas).
    from .routing import RoutedRequest, RoutingConfig

# How requests are spread over the model replicas: by their prompt's prefix (PrefixAffinityRouter), or by Ray
# Serve's own router (queue lengths only).
RAY_ROUTERS = ("prefix", "ray")
# The response header naming the model replica (its pid, as /health says) that answered a request.
REPLICA_HEADER = b"x-codegen-replica"


class CodegenReplica:
    """One Ray Serve model replica: the codegen-serve app over its own session, answering the requests the
    ingress forwards (forward). Not an ingress itself (Ray takes one per application): it runs the app's
    lifespan as Ray does for its ingress, opening the model when the replica starts and closing it when it
    stops (after graceful_shutdown_timeout_s for its requests)."""

    async def __init__(self, settings: ServeSettings):
        # An async constructor: Ray Serve awaits it (replica.py, initialize_callable), so the replica is ready
        # once the model is open.
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        self.settings = settings
        self._pid = str(os.getpid()).encode()
        if os.environ.get(_LOOPBACK_ENV) == "1":
            _replica_grpc_on_loopback()
        self._app = create_app(settings)
        # Ray's own way for its ingress (http_util.ASGIAppReplicaWrapper): uvicorn's lifespan handling.
        self._lifespan = LifespanOn(Config(self._app, lifespan="on", log_config=None, access_log=False))
        await self._lifespan.startup()
        if self._lifespan.should_exit:
            raise RuntimeError("codegen-serve: the model replica's app did not start; its log says why")

    async def __del__(self):
        # Ray Serve awaits it when the replica stops: the app drains and closes its session.
        if getattr(self, "_lifespan", None) is not None:
            await self._lifespan.shutdown()

    async def forward(self, request: RoutedRequest):
        """Answer a request the ingress forwarded through this replica's app: yields the app's ASGI messages;
        http.response.start gains the header X-Codegen-Replica: this process's pid.

        The app reads the whole body at once, then nothing until it is cancelled (the client went away and
        Ray cancels the call, as it cancels an HTTP request on its own ingress path)."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        app = asyncio.create_task(self._app(dict(request.scope), receive, messages.put))
        app.add_done_callback(lambda _: messages.put_nowait(None))  # after the app's last message
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    headers = [*message.get("headers", ()), (REPLICA_HEADER, self._pid)]
                    message = {**message, "headers": headers}
                yield message
            app.result()  # the app's own handlers answer its errors: one here is a bug, and Ray logs it
        finally:
            gone.set()
            app.cancel()  # a no-op once it is done


class CodegenIngress:
    """The HTTP entry of codegen-serve --ray: reads each request's body and forwards it, with the start of its
    prompt, to the model replicas (a DeploymentHandle of CodegenReplica, routed by PrefixAffinityRouter)."""

    def __init__(self, model, settings: ServeSettings, max_chars: int):
        self.model = model
        self.settings = settings
        self.max_chars = max_chars
        if os.environ.get(_LOOPBACK_ENV) == "1":
            _replica_grpc_on_loopback()

    def __serve_build_asgi_app__(self):
        return _Forwarder(self.model, self.settings, self.max_chars)


class _Forwarder:
    """The ASGI app of the ingress: each HTTP request goes whole to CodegenReplica.forward, whose messages come
    back as the answer."""

    def __init__(self, model, settings: ServeSettings, max_chars: int):
        self.model = model.options(method_name="forward", stream=True)
        # The gate's own key and limit (app.py's _Gate), so that the body is read no further than it would be.
        self.key = bearer_key(settings)
        self.limit = settings.max_body_bytes
        self.max_chars = max_chars

    async def __call__(self, scope, receive, send):
        from .routing import RoutedRequest, routing_text  # imported by the replica's start: a lookup

        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        if scope["type"] != "http":  # the app has no websocket routes
            return await send({"type": "websocket.close", "code": 1000})
        body = await self._read_body(scope, receive)
        if body is None:
            return  # the client went away
        request = RoutedRequest(_plain_scope(scope), body, routing_text(scope["path"], body, self.max_chars))
        responses = self.model.remote(request)
        started = finished = False
        try:
            async for message in responses:
                started = started or message["type"] == "http.response.start"
                await send(message)
            finished = True
        except Exception as e:  # the model replica failed (it died, say): an answer if none has begun
            if started:
                raise
            message = f"no model replica could answer: {type(e).__name__}: {e}"
            await _answer(send, 503, error_body(message, type="server_error"))
        finally:
            if not finished:  # the client went away (Ray cancels this call): so does the model replica's
                responses.cancel()

    async def _read_body(self, scope, receive) -> bytes | None:
        """The body, read only as far as the app's gate (app.py's _Gate) reads it: not at all when the gate
        answers from the headers alone (a missing API key, a bad or too large Content-Length), else up to the
        first message past the limit (the gate then answers 413). None when the client went away."""
        headers = dict(scope["headers"])
        if not authorized(self.key, scope["path"], headers.get(b"authorization", b"")):
            return b""
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return b""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit or not message.get("more_body", False):
                return b"".join(chunks)


# The parts of an HTTP scope the model replica's app reads (Ray's proxy may add its own, not all picklable).
_SCOPE_KEYS = (
    "type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "root_path", "query_string",
    "headers", "client", "server",
)  # fmt: skip


def _plain_scope(scope) -> dict:
    return {k: scope[k] for k in _SCOPE_KEYS if k in scope}


async def _lifespan(receive, send) -> None:
    # The forwarder has nothing to open or close.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            return await send({"type": "lifespan.shutdown.complete"})


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
    routing: RoutingConfig | None = None,
    router: str = "prefix",
):
    """The bound Ray Serve application: `replicas` model replicas, or autoscaling from `replicas` to
    `max_replicas` on ongoing requests (a replica is busy at max_batch of them), behind one ingress replica that
    routes each request by its prompt's prefix (router "prefix", with `routing`; by default affinity yields to
    load once the affine replica has half a batch more requests than the least loaded one), or by Ray Serve's own
    router (router "ray": the replicas' queue lengths only)."""
    _, serve = _import_ray()
    from ray.serve.config import RequestRouterConfig

    from .routing import PrefixAffinityRouter, RoutingConfig

    if router not in RAY_ROUTERS:
        raise InputError(f"unknown router {router!r}: choose one of {', '.join(RAY_ROUTERS)}")
    if max_replicas is not None and max_replicas < replicas:
        raise InputError(f"--max-replicas {max_replicas} is below --replicas {replicas}: raise it or leave it out")
    if routing is None:
        # Within half a batch the affine replica's batch still has room, and its prefix cache saves the prompt.
        routing = RoutingConfig(imbalance_threshold=max(1, settings.max_batch // 2))
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
    per_replica = settings.max_batch + settings.max_queue
    model = serve.deployment(CodegenReplica, name="codegen")
    model = model.options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus},
        max_ongoing_requests=per_replica,
        graceful_shutdown_timeout_s=settings.shutdown_grace,  # a stopping replica's wait for its requests
        **(
            {
                "request_router_config": RequestRouterConfig(
                    request_router_class=PrefixAffinityRouter, request_router_kwargs=dataclasses.asdict(routing)
                )
            }
            if router == "prefix"
            else {}
        ),
        **scaling,
    ).bind(settings)
    # One ingress replica: the router's records of what each model replica was sent live in its process, so it
    # must see every request. It only relays bytes (no CPU reserved); it takes as many requests as all the model
    # replicas together, the rest wait in Ray's proxy.
    ingress = serve.deployment(serve.ingress()(CodegenIngress), name="codegen-ingress")
    return ingress.options(
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=per_replica * (max_replicas or replicas),
        graceful_shutdown_timeout_s=settings.shutdown_grace,
    ).bind(model, settings, routing.max_chars)


def serve_with_ray(
    settings: ServeSettings,
    host: str = "127.0.0.1",
    port: int = 8000,
    replicas: int = 1,
    max_replicas: int | None = None,
    replica_cpus: float = 1.0,
    replica_gpus: float | None = None,
    node_ip: str = "127.0.0.1",
    router: str = "prefix",
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
        app = build_deployment(settings, replicas, max_replicas, replica_cpus, replica_gpus, router=router)
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
