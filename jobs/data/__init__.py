"""Rows in, examples out: reading user files, the bundled demo, tokenising and batching."""
