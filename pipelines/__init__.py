"""itfits library: one module per stage of the path data takes (see docs/ARCHITECTURE.md)."""
__version__ = "0.1.0"
