"""wan22_core: the Wan2.2 T2V-A14B engine (no ComfyUI imports anywhere in this package)."""

__version__ = "0.1.0"
