"""Built-in transforms. Importing this package registers each of them in the registry."""

from growcli.transforms.registry import REGISTRY, Context, StepReport, register  # noqa: F401
from growcli.transforms import widen  # noqa: F401,E402
from growcli.transforms import transformer  # noqa: F401,E402
from growcli.transforms import stack  # noqa: F401,E402
from growcli.transforms import deepen  # noqa: F401,E402
