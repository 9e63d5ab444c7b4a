"""Built-in transforms. Importing this package registers each of them in the registry."""

from growcli.transforms.registry import REGISTRY, Context, StepReport, register  # noqa: F401
