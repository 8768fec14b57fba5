"""The bake-off: many short runs of several methods on one dataset, chosen rates, and its report."""
