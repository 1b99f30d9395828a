"""`genvisor` / `python -m genvisor`: `serve` runs the daemon, every other verb is a client.

The root imports no room eagerly: the daemon is imported only to serve.
"""

from __future__ import annotations

import argparse
import sys


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genvisor serve", description="Run the genvisor daemon in the foreground.")
    parser.add_argument("--config", help="TOML config file")
    parser.add_argument("--endpoint", help="ZeroMQ endpoint to listen on (ipc://PATH or tcp://HOST:PORT)")
    parser.add_argument("--state-dir", help="directory for the daemon's state")
    parser.add_argument("--metrics", help="HOST:PORT for Prometheus metrics (loopback)")
    parser.add_argument("--log-format", choices=["auto", "text", "json", "journal"],
                        help="log lines as text, JSON, or for journald (default: auto — journald's under systemd, else text); "
                             "the level is $GENVISOR_LOG_LEVEL (INFO)")
    args = parser.parse_args(argv)
    from genvisor.daemon.config import ConfigError, load_config
    from genvisor.daemon.server import main as serve_main

    try:
        config = load_config(args.config, endpoint=args.endpoint, state_dir=args.state_dir, metrics=args.metrics,
                             log_format=args.log_format)
    except ConfigError as exc:
        print(f"genvisor serve: {exc}", file=sys.stderr)
        return 2
    return serve_main(config)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        return serve(argv[1:])
    from genvisor.client.cli import main as client_main

    return client_main(argv)


if __name__ == "__main__":
    sys.exit(main())
