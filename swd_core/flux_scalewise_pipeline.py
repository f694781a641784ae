"""A FluxPipeline that samples scale-wise: shipped as `pipeline.py` in an exported FLUX student's
folder, so that diffusers alone loads and samples it (this file imports nothing from the project):

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)
    swd = json.load(open(f"{folder}/swd_schedule.json"))
    image = pipe(prompt, scales=swd["scales"], sigmas=swd["sigmas"], guidance_scale=swd["guidance_scale"],
                 max_sequence_length=swd["max_sequence_length"]).images[0]

Stock `FluxPipeline` hands packed latents to its scheduler and samples at one size. Here each
step runs at its own latent side: the transformer predicts a velocity on the packed tokens, the
clean latent x̂0 = x − σ·v is upscaled bicubically to the next side (unpacked, in latent space)
and re-noised to the next sigma with fresh noise, as in "Scale-wise Distillation of Diffusion
Models" (arXiv 2503.16397).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class SwDFluxScalewisePipeline(FluxPipeline):
    """`FluxPipeline` with a scale-wise `__call__`: the student's few steps, each at its own
    latent side (see the module); its components and loading are `FluxPipeline`'s."""

    @torch.no_grad()
    def __call__(self, prompt, scales, sigmas, guidance_scale: float = 3.5, generator=None,
                 max_sequence_length: int = 512, output_type: str = "pil", latents: torch.Tensor | None = None):
        """Sample images scale-wise.

        Args:
            prompt (`str` or `list[str]`): the prompts.
            scales (`Sequence[int]`): the latent side of every step (unpacked, even).
            sigmas (`Sequence[float]`): every step's noise level.
            guidance_scale (`float`): the embedded guidance (ignored without a guidance embedding).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one, or one per
                image, for the initial and the re-noising draws.
            max_sequence_length (`int`): T5 tokens per prompt.
            output_type (`str`): "pil", "np", "pt" or "latent" (the last clean latents, unpacked).
            latents (`torch.Tensor`, *optional*): the first step's noise, (B, C, scales[0], scales[0]).

        Returns:
            `FluxPipelineOutput`: the images.
        """
        if len(scales) != len(sigmas):
            raise ValueError(f"{len(scales)} scales but {len(sigmas)} sigmas")
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        device = self._execution_device
        embeds, pooled, text_ids = self.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                      max_sequence_length=max_sequence_length)
        dtype = self.transformer.dtype
        batch, channels = len(prompt), self.transformer.config.in_channels // 4
        if latents is None:
            latents = randn_tensor((batch, channels, scales[0], scales[0]), generator=generator, device=device,
                                   dtype=torch.float32)
        sig = torch.tensor(list(sigmas), dtype=torch.float32)
        guidance = (torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        x = latents
        for i, side in enumerate(scales):
            ids = self._prepare_latent_image_ids(1, side // 2, side // 2, device, dtype)
            tokens = self.transformer(
                hidden_states=self._pack_latents(x.to(dtype), batch, channels, side, side),
                timestep=sig[i].to(device).expand(batch).to(dtype), guidance=guidance, pooled_projections=pooled,
                encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
            v = self._unpack_latents(tokens, side, side, 1).to(torch.float32)
            x0 = x.to(torch.float32) - sig[i].to(device) * v
            if i == len(scales) - 1:
                break
            if scales[i + 1] != side:
                x0 = F.interpolate(x0, size=(scales[i + 1], scales[i + 1]), mode="bicubic")
            fresh = randn_tensor(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
            x = (1 - sig[i + 1].to(device)) * x0 + sig[i + 1].to(device) * fresh
        if output_type == "latent":
            return FluxPipelineOutput(images=x0)
        z = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        image = self.vae.decode(z, return_dict=False)[0]
        self.maybe_free_model_hooks()
        return FluxPipelineOutput(images=self.image_processor.postprocess(image, output_type=output_type))
