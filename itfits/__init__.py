"""itfits as a library: `itfits.fit(data, **options) -> Run` and `itfits.load(model) -> Model`.

    import itfits
    run = itfits.fit("data/fashion", out="runs/fashion", epochs=3)   # what `itfits fit` does; run.learn: fastai's
    model = itfits.load(run.bundle)                                  # or "runs/fashion", or an .onnx export
    model.predict("photo.png")                                       # one Prediction
    model.predict([pil_image, numpy_array, "more/"])                 # a list of them
    model.predict_table(["folder/"])                                 # the predictions table, as `itfits predict`

The names are imported when first used (PEP 562), so `import itfits` is quick and imports no torch; the code lives
in `itfits/api.py` over the stages in `pipelines/`.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["fit", "load", "Run", "Model", "Prediction", "FitConfig", "PredictConfig", "ItfitsError"]


def __getattr__(name: str):
    if name in __all__:
        value = getattr(importlib.import_module(".api", __name__), name)
        globals()[name] = value  # once: later lookups skip this function
        return value
    raise AttributeError(f"module 'itfits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
