"""data/registry.py: arguments checked against a factory's parameter hints, whatever its return
hint names."""

from __future__ import annotations

import functools

import pytest

from data.registry import Registry, RegistryError


def test_parameter_hints_are_checked_and_the_return_hint_is_never_resolved():
    registry = Registry("op")

    # The return hint names a module this file never imports: registering, describing and
    # checking the factory must not need it (as ops whose results are TensorFlow types).
    @registry.register("scale")
    def scale(factor: float, key: str | None = None) -> unimported.Tensor:  # noqa: F821
        return factor

    @registry.register("wrapped")
    @functools.wraps(scale)
    def wrapped(*args, **kwargs):
        return scale(*args, **kwargs)

    for name in ("scale", "wrapped"):
        assert registry.usage(name) == f"{name}(factor: float, key: str | None = None)"
        assert registry.build(name, 2) == 2
        with pytest.raises(RegistryError, match="argument factor='2' should be float"):
            registry.check_arguments(name, ["2"], {})
        with pytest.raises(RegistryError, match="argument key=3 should be str | None"):
            registry.build(name, 1.0, key=3)
