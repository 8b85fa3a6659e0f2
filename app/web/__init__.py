"""The web page of `itfits serve` (server.py) and its upload handling (uploads.py)."""
from .server import create_app, serve

__all__ = ["create_app", "serve"]
