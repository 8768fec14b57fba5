"""Start the studio in the browser: ``python app.py [--host H] [--port P] [--auth user:password] [--home DIR]``.

It binds 127.0.0.1 by default. Binding any other address needs a password, given with
``--auth`` or the ``STUDIO_AUTH`` environment variable (``user:password``). Everything a
caller names stays inside the studio home; the ``--allow-*`` flags widen that.
"""
from __future__ import annotations

import argparse
import os
import sys

from jobs.home import AUTH_ENV


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
    safety = p.add_argument_group("what callers may do (default: only the studio home, see README: Security)")
    safety.add_argument("--allow-path", action="append", default=[], metavar="DIR",
                        help="also let callers read datasets and models from DIR and write runs (output_dir) "
                             "under it; repeatable")
    safety.add_argument("--allow-remote-code", action="store_true",
                        help="accept trust_remote_code: true (runs code shipped with a model)")
    safety.add_argument("--allow-multi-node", action="store_true",
                        help="accept nnodes, node_rank and rdzv_endpoint (connects to other machines)")
    safety.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="also answer requests addressed to, or coming from pages on, NAME "
                             "(e.g. a reverse proxy's name); repeatable")
    safety.add_argument("--max-upload-mb", type=float, default=200.0, help="largest upload accepted (default 200)")
    safety.add_argument("--mcp", action="store_true", help="also serve the API as an MCP server (off by default)")
    return p


def main(argv: list[str] | None = None) -> int:
    from adapters.core.errors import StudioError

    args = build_parser().parse_args(argv)
    try:
        from studio.ui.app import launch, parse_auth

        # Read once, then gone from the environment: nothing this process starts inherits it.
        from_env = os.environ.pop(AUTH_ENV, None)
        auth = parse_auth(args.auth or from_env)
        launch(args.home, args.host, args.port, auth, args.model, scheduler=not args.no_scheduler,
               allow_paths=tuple(args.allow_path), allow_remote_code=args.allow_remote_code,
               allow_multi_node=args.allow_multi_node, allow_hosts=tuple(args.allow_host),
               max_upload_mb=args.max_upload_mb, mcp=args.mcp)
    except StudioError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
