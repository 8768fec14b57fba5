"""The memory estimate before launch: the plan's footprint and the probe that measures it."""
