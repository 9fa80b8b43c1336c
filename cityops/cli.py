"""The `cityops` console script: one entry point, one subcommand per service or tool."""

from __future__ import annotations

import importlib
import sys

# subcommand -> module that exposes `main(argv: list[str]) -> int`
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("cityops.ingest.main", "run the MQTT -> Kafka ingest service"),
    "rules": ("cityops.rules.main", "run the rules / ticketing service"),
    "api": ("cityops.api.main", "run the HTTP API and its read-model projector"),
    "simulate": ("cityops.simulator.main", "run a simulated fleet of city devices"),
    "migrate": ("cityops.common.migrate", "apply database migrations"),
    "kinds": ("cityops.kinds.main", "list the configured device kinds, or --check kind files"),
    "stack": ("cityops.stack.main", "install, start, stop the native infrastructure stack"),
}


def usage() -> str:
    """Return the top-level help text."""
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: cityops <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; its module is imported only when it is chosen."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"cityops: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
