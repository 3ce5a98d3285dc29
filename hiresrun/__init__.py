"""hiresrun: adapt a pre-trained low-resolution diffusion model to a higher resolution, and sample it faster.

The Python API (hiresrun/api.py) is loaded on first use, so that `import hiresrun` (and the command line's config
composition, which imports this package) stays free of torch:

    hiresrun.sample(...), hiresrun.train(...), hiresrun.pretrain(...), hiresrun.calibrate(...),
    hiresrun.evaluate(...), hiresrun.merge(...)  -> Result (run folder, metrics, images)
    hiresrun.load(...) -> Sampler; hiresrun.config(verb, ...) -> the composed config
    hiresrun.HiresrunError: what every refusal and failure raises, its message the command line's one line
"""

__version__ = "0.1.0"

_API = ("sample", "train", "pretrain", "calibrate", "evaluate", "merge", "load", "config", "Result")
__all__ = [*_API, "Sampler", "HiresrunError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        from hiresrun import api

        return getattr(api, name)
    if name == "Sampler":
        from hiresrun.sampling import Sampler

        return Sampler
    if name == "HiresrunError":
        from hiresrun.errors import HiresrunError

        return HiresrunError
    raise AttributeError(f"module 'hiresrun' has no attribute {name!r}")
