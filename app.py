"""Start the studio on the bundled defaults.

Until the browser UI lands this runs the demo: a short LoRA fine-tune of the bundled
SmolLM2-135M-Instruct on the bundled date task, then prints what it produced.
"""
from __future__ import annotations

import sys
from pathlib import Path

DEMO_SPEC = Path(__file__).resolve().parent / "assets" / "specs" / "demo_lora.yaml"


def main(argv: list[str] | None = None) -> int:
    from studio.cli import main as studio

    argv = list(sys.argv[1:] if argv is None else argv)
    return studio(["train", str(DEMO_SPEC), *argv])


if __name__ == "__main__":
    sys.exit(main())
