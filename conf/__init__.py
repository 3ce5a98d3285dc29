"""hiresrun's Hydra configs, installed as the package `hiresrun.conf`. Importing it (Hydra does, to read the
files) registers each method's and accelerator's schema, its constructor's defaults (hiresrun/schema.py)."""

from hiresrun.schema import register

register()
