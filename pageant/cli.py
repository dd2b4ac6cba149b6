"""The ``pageant`` command: a thin dispatcher that imports only the part a subcommand needs.

The operator's image has no torch, so ``pageant operator ...`` and ``pageant crd`` must never
import the engine; each subcommand's module is imported lazily.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function, one-line help). Each function takes argv (list[str]) and
# returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("pageant.engine.server.cli", "main", "run the OpenAI-compatible server"),
    "bench": ("pageant.engine.bench.cli", "main", "benchmarks: `bench serve`, `bench throughput`"),
    "operator": ("pageant.operator.cli", "main", "the Kubernetes operator: `operator run`, `operator render`"),
    "crd": ("pageant.operator.cli", "crd_main", "print the InferenceService CustomResourceDefinition"),
}


def _usage() -> str:
    from pageant import __version__

    lines = [f"pageant {__version__}", "", "usage: pageant <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `pageant <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        from pageant import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pageant: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name, _ = COMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    code = func(rest)
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
