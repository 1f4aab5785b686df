"""opskit: launch, watch and collect RoPE-spectrum training runs (control plane; never imports torch)."""

__version__ = "0.1.0"
