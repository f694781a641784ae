"""Ray Serve deployment of an exported SwD student (the pipeline's deploy stage); see docs/serve.md."""

from pipelines.serve.app import app_builder, app_name, build_app

__all__ = ["app_builder", "app_name", "build_app"]
