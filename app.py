"""Start the studio in the browser: ``python app.py [--host H] [--port P] [--auth user:password] [--home DIR]``.

It binds 127.0.0.1 by default. Binding any other address needs a password, given with
``--auth`` or the ``STUDIO_AUTH`` environment variable (``user:password``).
"""
from __future__ import annotations

import argparse
import os
import sys

AUTH_ENV = "STUDIO_AUTH"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python app.py", description="The fine-tuning studio in the browser.")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help=f"require this login (default: ${AUTH_ENV}); required for any host but localhost")
    p.add_argument("--home", default=None, help="studio home folder (default: $STUDIO_HOME, else ~/.studio)")
    p.add_argument("--model", default=None, help="base model the forms start with (default: the bundled SmolLM2)")
    p.add_argument("--no-scheduler", action="store_true",
                   help="never start jobs from this process (a separate `studio worker` does)")
    return p


def main(argv: list[str] | None = None) -> int:
    from jobs.errors import StudioError

    args = build_parser().parse_args(argv)
    try:
        from studio.ui.app import launch, parse_auth

        auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
        launch(args.home, args.host, args.port, auth, args.model, scheduler=not args.no_scheduler)
    except StudioError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
