"""codegen-serve: serve an export over HTTP (OpenAI legacy Completions, FauxPilot's engine path)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import math
import os
import signal
import socket
import sys
from pathlib import Path

from ..errors import InputError, MissingDependencyError
from ..runtime.backends import BACKENDS
from ..runtime.engine import GAP_STEPS
from ..runtime.speculate import SPECULATE_MODES
from .common import (
    ArgumentParser,
    Terminated,
    add_device_options,
    device_options,
    float_in,
    int_at_least,
    memory_size,
    run,
    threads_type,
)

# The API key's environment variable: unlike --api-key, it does not show in `ps`.
API_KEY_ENV = "CODEGEN_SERVE_API_KEY"


def _chunk(text: str) -> int | None:
    """--prefill-chunk's value: "auto" (None) or a whole number >= 0."""
    if text == "auto":
        return None
    try:
        return int_at_least(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 0, got {text!r}") from None


def _port(text: str) -> int:
    """--port's value: a TCP port, 0 asking the system for a free one."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535 (0: any free port), got {port}")
    return port


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="codegen-serve",
        description="Serve an export folder (or engine, or checkpoint) with the OpenAI Completions API and "
        "continuous batching; with --ray, as Ray Serve replicas.",
    )
    p.add_argument("path", help="export folder, engine folder or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument(
        "--port",
        type=_port,
        default=8000,
        help="default: 8000; 0: a free port the system chooses (the port bound is printed at start-up)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        help="default: onnxruntime for an export folder, tensorrt for an engine, torch for a checkpoint",
    )
    p.add_argument("--max-batch", type=int_at_least(1), default=8, help="rows generating at once (default: 8)")
    p.add_argument(
        "--max-queue", type=int_at_least(0), default=64, help="rows waiting at most; beyond, 429 (default: 64)"
    )
    p.add_argument(
        "--cache-memory",
        type=memory_size,
        default=None,
        metavar="SIZE|auto",
        help="memory for idle prompts' caches (e.g. 4GiB; 0: no prefix reuse), so a prompt that starts like an "
        "earlier one computes only the rest; the least recently used are evicted first (default: auto, a quarter "
        "of the memory available at start-up, stated with the tokens it holds)",
    )
    p.add_argument(
        "--cache-reuse",
        type=int_at_least(0),
        default=0,
        metavar="N",
        help="also reuse runs of at least N cached tokens that moved to earlier positions (the extra chunks of "
        "/infill, the cut start of a long request), their keys turned for the new positions; approximate, since "
        "a run was computed after other text, so answers may depend on earlier requests (default: 0, off)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=_chunk,
        default=None,
        metavar="N|auto",
        help="prompt tokens computed between two decode steps while other rows generate, so a long prompt never "
        f"stalls their streams (default: auto, sized from measured costs to keep their gaps near {GAP_STEPS:g} "
        "steps; 0: whole prompts at once)",
    )
    p.add_argument(
        "--speculate",
        choices=SPECULATE_MODES,
        default="auto",
        help="speculative decoding of greedy rows while at most 2 rows generate (exact: the same tokens): lookup "
        "(n-grams of the prompt and output), draft (--draft), off; auto (default): draft with --draft, else "
        "lookup, where the session runs it exactly",
    )
    p.add_argument("--draft", metavar="EXPORT", help="a smaller export with the same tokenizer to draft tokens")
    p.add_argument("--model-name", help="the model name to serve; other names get a 404 (default: any name)")
    p.add_argument(
        "--api-key",
        help="require `Authorization: Bearer KEY` on every route but /health (shows in `ps`: prefer "
        f"--api-key-file or ${API_KEY_ENV})",
    )
    p.add_argument("--api-key-file", metavar="FILE", help="read the API key from the first line of FILE")
    p.add_argument(
        "--max-body-mb",
        type=float_in(0.001, 1024),
        default=4.0,
        help="the largest request body taken, in MB; larger ones get a 413, unread (default: 4)",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float_in(0, 3600),
        default=10.0,
        metavar="SECONDS",
        help="on SIGTERM or Ctrl-C, stop accepting and give running requests this long to finish; streams still "
        "running then end with an error event (default: 10)",
    )
    p.add_argument(
        "--threads", type=threads_type, help="intra-op threads (torch, onnxruntime; at most the cores this machine has)"
    )
    p.add_argument("--providers", help="onnxruntime execution providers, e.g. cuda,cpu")
    p.add_argument(
        "--max-context", type=int_at_least(1), help="tokens per row (prompt + completion; default: the model's)"
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: PATH)")
    p.add_argument(
        "--suffix",
        choices=("ignore", "error"),
        default="ignore",
        help="a request's `suffix` on a model that cannot fill in the middle (CodeGen1; CodeGen2 fills it in): "
        "ignore it and continue the prompt, as FauxPilot does (default), or answer vLLM's 400 'suffix is not "
        "currently supported' (and 501 on /infill, as llama.cpp)",
    )
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="a JSON file of how /v1/chat/completions writes messages as a prompt for this base model (keys "
        "system, user, assistant, comment, answer, stop; see the README); default: instructions as comments",
    )
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_device_options(p)
    ray = p.add_argument_group("Ray Serve (needs the ray extra)")
    ray.add_argument("--ray", action="store_true", help="run as Ray Serve replicas instead of one process")
    ray.add_argument("--replicas", type=int_at_least(1), default=1, help="replicas (default: 1)")
    ray.add_argument(
        "--max-replicas", type=int, help="autoscale between --replicas and this many replicas on ongoing requests"
    )
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs reserved per replica (default: 1)")
    ray.add_argument(
        "--replica-gpus", type=float, help="GPUs per replica (default: 1 where the Ray cluster has GPUs, else 0)"
    )
    ray.add_argument(
        "--ray-router",
        choices=("prefix", "ray"),
        default="prefix",
        help="how requests are spread over the replicas: prefix (default: to the replica most likely to hold the "
        "prompt's start in its prefix cache, unless it is much busier than the least loaded) or ray (Ray Serve's "
        "own router, by queue lengths only)",
    )
    ray.add_argument(
        "--ray-node-ip",
        default="127.0.0.1",
        metavar="ADDRESS",
        help="the address a local Ray's own services listen on (default: 127.0.0.1, this machine only; give the "
        "machine's address to let other nodes join); ignored with RAY_ADDRESS",
    )
    return p.parse_args(argv)


def api_key(args) -> str | None:
    """The API key: --api-key, --api-key-file or $CODEGEN_SERVE_API_KEY (in that order), or None."""
    if args.api_key is not None and args.api_key_file is not None:
        raise InputError("give --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"cannot read --api-key-file {args.api_key_file}: {e}") from e
        key, source = (lines[0] if lines else "").strip(), f"--api-key-file {args.api_key_file}"
    elif args.api_key is not None:
        key, source = args.api_key.strip(), "--api-key"
    elif os.environ.get(API_KEY_ENV) is not None:
        key, source = os.environ[API_KEY_ENV].strip(), f"${API_KEY_ENV}"
    else:
        return None
    if not key:
        raise InputError(f"the API key from {source} is empty: give a key, or none to serve without one")
    if not key.isprintable() or not key.isascii() or " " in key:
        raise InputError(f"the API key from {source} has spaces or characters a header cannot carry: use ASCII")
    return key


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (this machine only)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return False
    return all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos)


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket listening on host:port (uvicorn answers on it once the model is open), or InputError when the
    address cannot be had: a busy port is found before the model is loaded, in one line."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise InputError(f"--host {host} is not an address of this machine ({e}): give an IP address") from e
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no wait after a restart
    try:
        sock.bind(address)
        sock.listen(2048)  # taken now: a second server fails here, not after loading (connections wait meanwhile)
    except OSError as e:
        sock.close()
        hint = {
            errno.EADDRINUSE: "another server listens there: stop it or choose another --port",
            errno.EACCES: "ports below 1024 need root: choose another --port",
            errno.EADDRNOTAVAIL: "give an address of this machine (or 0.0.0.0 for all)",
        }.get(e.errno, "choose another --host or --port")
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}): {hint}") from e
    return sock


def warn_exposure(host: str, port: int, key: str | None) -> None:
    """Say when the server answers beyond this machine without a key."""
    if key is None and not is_loopback(host):
        print(
            f"warning: serving on {host}:{port}, beyond this machine, without an API key: anyone who can reach the "
            f"port can use the model; set one with --api-key-file FILE or ${API_KEY_ENV}",
            file=sys.stderr,
        )


def command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    from ..runtime.speculate import check_draft, check_draft_tokenizer
    from .common import check_paths

    check_paths(args)  # a missing PATH or --tokenizer: one line before anything is imported or loaded
    check_draft(args.speculate, args.draft)  # unused or missing
    if args.draft is not None:
        check_draft_tokenizer(args.draft, args.tokenizer or args.path)
    try:
        return _serve(args)
    # A requested stop, while loading or serving: the exit code says which (130 Ctrl-C, 143 SIGTERM), no error.
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143


def _serve(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MissingDependencyError(f'{e.name} is not installed: pip install "codegen-deploy[serve]"') from e
    from ..serve.app import ServerState, ServeSettings, create_app
    from ..serve.chat_template import load_chat_template
    from ..serve.metrics import Metrics
    from ..serve.server import CLOSE_MARGIN_S, DrainingServer

    key = api_key(args)
    chat_template = None if args.chat_template is None else load_chat_template(args.chat_template)
    settings = ServeSettings(
        path=args.path,
        backend=args.backend,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        model_name=args.model_name,
        api_key=key,
        threads=args.threads,
        providers=args.providers,
        max_context=args.max_context,
        tokenizer=args.tokenizer,
        suffix=args.suffix,
        cache_memory=args.cache_memory,
        cache_reuse=args.cache_reuse,
        prefill_chunk=args.prefill_chunk,
        speculate=args.speculate,
        draft=args.draft,
        max_body_mb=args.max_body_mb,
        shutdown_grace=args.shutdown_grace,
        chat_template=chat_template,
        device_options={k: v for k, v in device_options(args).items() if v is not None},
    )
    sock = listen_socket(args.host, args.port)  # before loading: a busy port is said at once
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    if args.ray:
        sock.close()  # Ray Serve's proxy binds it
    warn_exposure(args.host, port, key)
    if args.ray:
        from ..serve.ray import serve_with_ray

        return serve_with_ray(
            settings,
            host=args.host,
            port=port,
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus,
            node_ip=args.ray_node_ip,
            router=args.ray_router,
        )
    where = f"http://{f'[{args.host}]' if ':' in args.host else args.host}:{port}"
    try:
        # The address first: with --port 0 a script learns the port here, and connections made while the model
        # loads wait for it.
        print(f"codegen-serve: loading {args.path}; listening on {where}", file=sys.stderr, flush=True)
        state = ServerState(settings, Metrics())  # opened here, so a bad path or export is one error line
        print(f"codegen-serve: {state.batcher.describe_cache()}", file=sys.stderr)
        print(f"codegen-serve: {state.batcher.describe_chunks()}", file=sys.stderr)
        print(f"codegen-serve: {state.batcher.describe_speculation()}", file=sys.stderr)
        print(f"codegen-serve: {state.session.name} session; serving on {where}/v1", file=sys.stderr, flush=True)
        config = uvicorn.Config(
            create_app(settings, state=state),
            log_level=args.log_level,
            timeout_graceful_shutdown=math.ceil(args.shutdown_grace) + CLOSE_MARGIN_S,  # a backstop: see server.py
        )
        server = DrainingServer(config, state, args.shutdown_grace)
        server.run(sockets=[sock])
    finally:
        sock.close()
    return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(server.stopped_by, 0)


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
