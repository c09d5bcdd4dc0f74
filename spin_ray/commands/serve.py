"""`spin-ray serve`: run the Ray Serve application of deploy/app.yaml (or its built-in default)
until Ctrl-C. The same application as `serve run deploy/app.yaml`, with command-line overrides."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMPORT_PATH = "spin_ray.serve:build_app"


@dataclass(frozen=True)
class ServeRun:
    """What `spin-ray serve` deploys."""

    args: dict[str, Any] = field(default_factory=dict)
    """The application's `args` (deploy/app.yaml)."""
    host: str = "127.0.0.1"
    port: int = 8000
    name: str = "spin-ray"
    route_prefix: str = "/"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible API on Ray Serve",
        description="Run the spin-ray Ray Serve application (an OpenAI-compatible endpoint "
        "over engine replicas placed by the KV working-set router) until Ctrl-C.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="a Serve config file such as deploy/app.yaml (default: the built-in spin-tiny app)",
    )
    parser.add_argument("--model", help="checkpoint folder, hub id, or spin-tiny")
    parser.add_argument("--served-model-name", help="the model id clients send")
    parser.add_argument("--host", help="HTTP host (default 127.0.0.1, or the config's)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000, or the config's)")
    parser.add_argument("--num-replicas", type=int, help="a fixed number of engine replicas")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.set_defaults(func=run)


def resolve(args: argparse.Namespace) -> ServeRun:
    """The config file (if any) with the command-line overrides applied."""
    run = read_config(args.config) if args.config is not None else ServeRun()
    app_args = dict(run.args)
    if args.model is not None:
        app_args["model"] = args.model
    if args.served_model_name is not None:
        app_args["served_model_name"] = args.served_model_name
    if args.num_replicas is not None:
        app_args["engine"] = {**app_args.get("engine", {}), "num_replicas": args.num_replicas}
    return ServeRun(
        args=app_args,
        host=args.host if args.host is not None else run.host,
        port=args.port if args.port is not None else run.port,
        name=run.name,
        route_prefix=run.route_prefix,
    )


def read_config(path: Path) -> ServeRun:
    """The spin-ray application of a Serve config file (the one whose import_path is
    spin_ray.serve:build_app) and its HTTP options."""
    import yaml

    if not path.is_file():
        raise ValueError(f"config: {str(path)!r} is not a file")
    config = yaml.safe_load(path.read_text()) or {}
    apps = [a for a in config.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(
            f"config: {str(path)!r} must have exactly one application with import_path "
            f"{IMPORT_PATH}, found {len(apps)}"
        )
    app, http = apps[0], config.get("http_options") or {}
    return ServeRun(
        args=app.get("args") or {},
        host=http.get("host", ServeRun.host),
        port=http.get("port", ServeRun.port),
        name=app.get("name", ServeRun.name),
        route_prefix=app.get("route_prefix", ServeRun.route_prefix),
    )


def _deployment_failures(app_name: str) -> str:
    """What the Serve controller says of the application's failed deployments."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return ""
    return "; ".join(
        f"{name}: {status.message.strip().splitlines()[-1]}"
        for name, status in app.deployments.items()
        if status.status == "DEPLOY_FAILED" and status.message.strip()
    )


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from spin_ray.serve import build_app

    plan = resolve(args)
    ray.init(address=args.address)
    serve.start(http_options={"host": plan.host, "port": plan.port})
    application = build_app(plan.args)  # after ray.init: "auto" GPUs look at the cluster
    try:  # an engine that cannot start fails the deployment (max_constructor_retry_count)
        serve.run(application, name=plan.name, route_prefix=plan.route_prefix)
    except RuntimeError as err:
        causes = _deployment_failures(plan.name) or str(err)
        serve.shutdown()
        raise ValueError(f"the application failed to deploy: {causes}") from None
    print(
        f"spin-ray: OpenAI API at http://{plan.host}:{plan.port}{plan.route_prefix.rstrip('/')}/v1"
        " (Ctrl-C to stop)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0
