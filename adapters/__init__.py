"""Fine-tuning methods and update rules, each registered by name from its own module.

Adding a method or update rule is adding one module here that calls
``METHODS.register(...)`` / ``UPDATE_RULES.register(...)``: the registries import every
module of this package (and of its sub-packages) on their first lookup, so nothing else
needs editing. Its ``Config`` fields drive spec validation, the CLI and the UI form.

Importing this package imports nothing heavy: the web process imports ``adapters.core``
(errors) without torch, and the methods arrive only when a registry is first asked.
"""
from adapters.registry import METHODS, UPDATE_RULES  # noqa: F401
