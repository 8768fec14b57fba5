"""Fine-tuning methods and update rules, each registered by name from its own module.

Adding a method: write ``adapters/<name>.py`` that calls ``METHODS.register(...)`` and
import it below. Its ``Config`` fields drive spec validation, the CLI and the UI form.
"""
from adapters.registry import METHODS, UPDATE_RULES  # noqa: F401

# Methods.
from adapters import full, lora, dora, ia3, prefix, prompt  # noqa: F401,E401

# Update rules.
from adapters import torch_optim  # noqa: F401,E402
