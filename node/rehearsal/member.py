"""`python -m node.rehearsal.member --config F`: one member of a rehearsal as a process,
exactly `flnode run` (node/runtime/daemon.py) except that its config may have `[attack]` and
`[faults]` (node/rehearsal/config.py) and its node is built with them
(node/rehearsal/build.py). scripts/simulate_network.py starts its hostile and faulty
members this way; `flnode run` refuses such a config.
"""

from __future__ import annotations

import argparse
import logging

from node.rehearsal.build import build_rehearsal_node
from node.rehearsal.config import load_rehearsal_config
from node.runtime.daemon import exit_now
from node.runtime.daemon import main as run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m node.rehearsal.member",
        description="run one member of a rehearsal (`flnode run` with [attack] / [faults])")
    p.add_argument("--config", required=True, help="the member's TOML config")
    p.add_argument("--metrics-port", type=int, default=None, metavar="P",
                   help="serve Prometheus metrics on this port (0: a free one, printed)")
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_main(args.config, args.metrics_port, args.metrics_addr, args.log_format,
                    load=load_rehearsal_config, build=build_rehearsal_node)


if __name__ == "__main__":
    # As `flnode run`: ends at once once the node has closed its files (daemon.exit_now).
    exit_now(main())
