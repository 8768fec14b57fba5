"""The bottom of the studio: what every layer above needs and nothing of the project itself.

``studio → jobs → adapters → adapters.core``: the error type a user can cause (``errors``),
the heap returner the memory-lean update rules and quantizers share (``memory``), and the one
place that touches other libraries' private internals (``compat``). Nothing here imports torch
at module level or any other studio module, so the web process may import ``adapters.core.errors``
without pulling in a model library (``adapters/__init__.py`` fills its registries lazily for the
same reason).
"""
