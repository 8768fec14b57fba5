"""The job runner: the store (job state), the scheduler (who runs next) and the worker (one process per job)."""
