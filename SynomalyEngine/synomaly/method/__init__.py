"""The published method: Synomaly noise, the diffusion schedule, the denoising network, the presets."""
