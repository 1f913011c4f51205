"""Engines that embed a gallery for build-cache: the local Pipeline (in this process), or RayEngine."""
from __future__ import annotations

from lookalike.models.errors import UserError
from lookalike.pipeline.config import PipelineConfig

ENGINES = ("local", "ray")


def create_engine(name: str, config: PipelineConfig, address: str | None = None, pipeline=None):
    """None for 'local' (build_cache runs its pipeline here), else a RayEngine: Ray is imported only then."""
    if name == "local":
        if address:
            raise UserError("--ray-address needs --engine ray")
        return None
    if name != "ray":
        raise UserError(f"--engine {name}: use {' or '.join(ENGINES)}")
    try:
        from lookalike.pipeline.engines.ray_engine import RayEngine
    except ImportError as err:
        raise UserError(f"--engine ray needs Ray Data ({err}); pip install -e '.[ray]'") from None
    return RayEngine(config, address, pipeline=pipeline)
