"""vim2_kernels: selective-scan (Mamba S6) kernels."""
__version__ = "0.1.0"
