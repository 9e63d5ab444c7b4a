"""growcli: grow neural networks and prove they compute the same function.

Python API::

    import growcli
    gm = growcli.load_model("model.pt2")
    growcli.apply(gm, "widen", layer="fc1", to=512)
    growcli.save_model(gm, "grown.safetensors")
    model = growcli.load_grown(build_original(), "grown.safetensors")

``import growcli`` does not import torch: the API functions are looked up in
:mod:`growcli.api` the first time one is used.

The package is layered; each layer imports only from the ones before it:
``core`` (errors, model, edits, inputs) → ``verification`` (running and comparing models) →
``analysis`` (traces, coupled channels, residual stream) → ``transforms`` (the registry) →
``io`` (formats in and out) → ``run`` (steps, plans, the runner) → ``advise`` (suggest) →
``cli``. ``nn`` (growcli's own modules) and ``zoo`` (reference models) are public modules.
"""

from growcli.core.version import __version__

__all__ = ["__version__", "apply", "load_grown", "load_model", "save_model", "verify"]

_API = {"apply", "load_grown", "load_model", "save_model", "verify"}


def __getattr__(name: str):
    if name in _API:
        from growcli import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'growcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _API)
