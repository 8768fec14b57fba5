"""Quantizers and quantized layers shared by the quantized fine-tuning methods.

- ``nf4``: bitsandbytes 4-bit NF4/FP4 and 8-bit base layers (QLoRA, LoftQ).
- ``intgrid``: integer grids with per-row / per-group scales and zero points (PEQA, QA-LoRA).
- ``targets``: which linear layers get quantized, and swapping modules in place.
- ``saved``: quantized layers stored beside a run's adapter, restored bit for bit.
- ``export``: the quantized model of a run as a folder, and its loader.

Nothing here registers a method; bitsandbytes is imported only when a 4/8-bit layer is built.
"""
