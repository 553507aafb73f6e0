"""codegen-serve: an OpenAI- and FauxPilot-compatible completion server with continuous batching.

from codegen_deploy.serve import ServeSettings, create_app
app = create_app(ServeSettings("exports/codegen-350M-mono"))   # run with uvicorn, or serve/ray.py

Needs the `serve` extra (fastapi, uvicorn, prometheus_client); Ray Serve replicas need the `ray` extra.
"""

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
