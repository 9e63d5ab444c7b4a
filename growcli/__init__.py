"""growcli: grow neural networks and prove they compute the same function.

Python API::

    import growcli
    gm = growcli.load_model("model.pt2")
    growcli.apply(gm, "widen", layer="fc1", to=512)
    growcli.save_model(gm, "grown.safetensors")
    model = growcli.load_grown(build_original(), "grown.safetensors")
    growcli.grow_(model, "widen", optimizer, batch, layer="fc1", by=64)   # mid-training, state carried

``import growcli`` does not import torch: the API functions are looked up in
:mod:`growcli.api` the first time one is used.

The package is layered; each layer imports only from the ones before it (tests/test_layout.py
checks this): ``core`` (errors, model, edits, inputs) → ``io`` (formats in and out) →
``verification`` (running and comparing models) → ``analysis`` (traces, coupled channels,
residual stream, residual writers) → ``transforms`` (the registry) → ``run`` (steps, plans, the
one runner) → ``advise`` (suggest, inspect) → ``train`` (growth during training) → ``api`` →
``cli``. ``nn`` (growcli's own modules) and ``zoo`` (reference models) are public modules.
"""

from growcli.core.version import __version__

__all__ = ["__version__", "apply", "grow_", "load_grown", "load_model", "save_model", "save_models", "verify"]

# Public name → the module that defines it (imported on first use, so `import growcli` stays light).
_API = {"apply": "growcli.api", "load_grown": "growcli.api", "load_model": "growcli.api", "save_model": "growcli.api",
        "save_models": "growcli.api", "verify": "growcli.api", "grow_": "growcli.train.live"}


def __getattr__(name: str):
    if name in _API:
        import importlib

        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'growcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
