"""The size options transforms share: exactly one of ``to`` (new size), ``by`` (units added), ``factor``."""

from __future__ import annotations

from growcli.core.errors import UsageError


def check_one_size(spec, keys: tuple[str, ...]) -> None:
    """Raise :class:`UsageError` unless exactly one of ``keys`` is set, to a valid value."""
    given = [k for k in keys if getattr(spec, k) is not None]
    if len(given) != 1:
        raise UsageError(f"give exactly one of {', '.join(keys)}" + (f" (got {', '.join(given)})" if given else ""))
    value = getattr(spec, given[0])
    if given[0] == "factor" and value <= 1:
        raise UsageError(f"factor must be greater than 1, got {value}")
    if given[0] != "factor" and (not isinstance(value, int) or value < 1):
        raise UsageError(f"{given[0]} must be a positive integer, got {value!r}")


def target_size(spec, current: int) -> int:
    """The new size ``spec`` asks for, given the ``current`` one."""
    if spec.to is not None:
        return spec.to
    if getattr(spec, "by", None) is not None:
        return current + spec.by
    return int(round(current * spec.factor))
