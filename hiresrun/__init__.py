"""hiresrun: adapt a pre-trained low-resolution diffusion model to a higher resolution, and sample it faster."""

__version__ = "0.1.0"
