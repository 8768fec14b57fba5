"""Job description, data, training, export, and (later) the job store and scheduler."""
