"""The `pvqc` command: a small dispatcher that hands each subcommand to the package that owns it.

Imports happen only for the chosen subcommand, so `pvqc serve` never loads torch and `pvqc train`
never loads FastAPI.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, function taking argv, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("serving.cli", "serve_cli", "run the inspection service (uvicorn)"),
    "train": ("training.train", "cli", "train the cell classifier"),
    "evaluate": ("training.evaluate", "cli", "score a model on the fixed ELPV test split and write a report"),
    "export": ("training.export", "cli", "export a checkpoint to ONNX (FP32 + INT8) with its model card"),
    "simulate-line": ("datasets.line_simulator", "cli", "post generated module frames to a service"),
    "export-reviewed": (
        "serving.export_reviewed",
        "cli",
        "write reviewed cells (PNG + manifest) from the service's store, for retraining",
    ),
    "models": ("training.models", "cli", "model registry: list, evaluate, promote, rollback, shadow"),
    "prune-frames": (
        "serving.cli",
        "prune_frames_cli",
        "run the frame retention pass now, or count what it would delete (--dry-run)",
    ),
}


def usage() -> str:
    lines = ["usage: pvqc COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<15} {help_text}" for name, (_, _, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"pvqc: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        print(f"pvqc {name}: cannot load {module_name}: {exc}", file=sys.stderr)
        return 2
    result = getattr(module, function_name)(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
