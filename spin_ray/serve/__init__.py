"""Ray Serve deployment of spin-ray: an OpenAI-compatible endpoint over engine replicas placed
by a KV working-set router. `serve run deploy/app.yaml` uses `build_app`."""

__all__ = ["build_app"]


def __getattr__(name: str):
    # Ray and the engine load on first use, so the pure modules here import without them.
    if name == "build_app":
        from spin_ray.serve.app import build_app

        return build_app
    raise AttributeError(f"module 'spin_ray.serve' has no attribute {name!r}")
