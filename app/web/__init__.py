"""The web page of `itfits serve` (server.py) and its upload handling (uploads.py)."""
from .server import MODALITIES, create_app, serve

__all__ = ["MODALITIES", "create_app", "serve"]
