"""Fine-tuning methods and update rules, each registered by name from its own module.

Adding a method or update rule is adding one module here that calls
``METHODS.register(...)`` / ``UPDATE_RULES.register(...)``: every module of this package
(and of its sub-packages) is imported once below, so nothing else needs editing. Its
``Config`` fields drive spec validation, the CLI and the UI form.
"""
import importlib
import pkgutil

from adapters.registry import METHODS, UPDATE_RULES  # noqa: F401

_INFRASTRUCTURE = {"registry", "base"}


def _import_all() -> None:
    for info in pkgutil.walk_packages(__path__, prefix=f"{__name__}."):
        leaf = info.name.rsplit(".", 1)[-1]
        if leaf.startswith("_") or leaf in _INFRASTRUCTURE:
            continue
        importlib.import_module(info.name)


_import_all()
