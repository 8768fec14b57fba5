"""The training recipe and what it runs on: device and precision, loss, models, checkpoints, processes."""
