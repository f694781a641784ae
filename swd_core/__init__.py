"""SwD: scale-wise distillation of flow-matching text-to-image models.

The algorithm and model adapters, usable without Ray: schedules, scale ops, samplers, losses,
the GAN head, LoRA roles on one shared base, and export. `pipelines/` runs it on Ray.
"""

__version__ = "0.1.0"
