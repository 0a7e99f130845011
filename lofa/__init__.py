"""lofa — reproduction package for LoFA (CVPR 2026): predicting personalized LoRA priors with a two-stage
transformer hypernetwork. See README.md for the pipeline; the library is what the notebooks call."""

__version__ = "0.1.0"
