"""codegen-serve: serve an export over HTTP (OpenAI legacy Completions, FauxPilot's engine path)."""

from __future__ import annotations

import argparse
import sys

from ..errors import MissingDependencyError
from ..runtime.backends import BACKENDS
from ..serve.batcher import GAP_STEPS
from .common import ArgumentParser, add_device_options, device_options, int_at_least, run


def _chunk(text: str) -> int | None:
    """--prefill-chunk's value: "auto" (None) or a whole number >= 0."""
    if text == "auto":
        return None
    try:
        return int_at_least(0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number >= 0, got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="codegen-serve",
        description="Serve an export folder (or engine, or checkpoint) with the OpenAI Completions API and "
        "continuous batching; with --ray, as Ray Serve replicas.",
    )
    p.add_argument("path", help="export folder, engine folder or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int_at_least(1), default=8000, help="default: 8000")
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
        "--cache-slots",
        type=int_at_least(0),
        help="idle row slots that keep their prompt's cache, so a prompt that starts like an earlier one computes "
        "only the rest (default: --max-batch; 0: off)",
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
    p.add_argument("--model-name", help="the model name to serve; other names get a 404 (default: any name)")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every route but /health")
    p.add_argument("--threads", type=int_at_least(1), help="intra-op threads (torch, onnxruntime)")
    p.add_argument("--providers", help="onnxruntime execution providers, e.g. cuda,cpu")
    p.add_argument(
        "--max-context", type=int_at_least(1), help="tokens per row (prompt + completion; default: the model's)"
    )
    p.add_argument("--tokenizer", help="tokenizer folder (default: PATH)")
    p.add_argument(
        "--suffix",
        choices=("ignore", "error"),
        default="ignore",
        help="a request's `suffix` (CodeGen1 cannot fill in the middle): ignore it and continue the prompt, as "
        "FauxPilot does (default), or answer vLLM's 400 'suffix is not currently supported'",
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
    return p.parse_args(argv)


def command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise MissingDependencyError(f'{e.name} is not installed: pip install "codegen-deploy[serve]"') from e
    from ..serve.app import ServerState, ServeSettings, create_app
    from ..serve.metrics import Metrics

    settings = ServeSettings(
        path=args.path,
        backend=args.backend,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        model_name=args.model_name,
        api_key=args.api_key,
        threads=args.threads,
        providers=args.providers,
        max_context=args.max_context,
        tokenizer=args.tokenizer,
        suffix=args.suffix,
        cache_slots=args.cache_slots,
        prefill_chunk=args.prefill_chunk,
        device_options={k: v for k, v in device_options(args).items() if v is not None},
    )
    if args.ray:
        from ..serve.ray import serve_with_ray

        serve_with_ray(
            settings,
            host=args.host,
            port=args.port,
            replicas=args.replicas,
            max_replicas=args.max_replicas,
            replica_cpus=args.replica_cpus,
            replica_gpus=args.replica_gpus,
        )
        return 0
    print(f"codegen-serve: loading {args.path}", file=sys.stderr)
    state = ServerState(settings, Metrics())  # opened here, so a bad path or export is one error line
    print(f"codegen-serve: {state.batcher.describe_cache()}", file=sys.stderr)
    print(f"codegen-serve: {state.batcher.describe_chunks()}", file=sys.stderr)
    print(f"codegen-serve: {state.session.name} session; serving on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(
        create_app(settings, state=state),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
