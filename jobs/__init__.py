"""Job description, data, training, export, the job store and the scheduler."""
import logging

# On the CPU bitsandbytes tries an optional kernel package that downloads its kernels from
# the Hub, warns when it is absent, and falls back to its own implementation. The studio
# runs offline by design, so the warning is noise on every start.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
