"""growcli: grow saved neural networks and prove they compute the same function.

Python API::

    import growcli
    gm = growcli.load_model("model.pt2")
    growcli.apply(gm, "widen", layer="fc1", to=512)
    growcli.save_model(gm, "grown.safetensors")
    model = growcli.load_grown(build_original(), "grown.safetensors")
"""

__version__ = "0.1.0"

from growcli.api import apply, load_grown, load_model, save_model, verify  # noqa: E402

__all__ = ["__version__", "apply", "load_grown", "load_model", "save_model", "verify"]
