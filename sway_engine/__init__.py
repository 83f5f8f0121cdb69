"""sway engine: differential evaluation of LoRA adapters against calibrated null adapters."""

__version__ = "0.1.0"
