"""vim2: Vision MambaMixer (ViM2) backbones."""
__version__ = "0.1.0"
