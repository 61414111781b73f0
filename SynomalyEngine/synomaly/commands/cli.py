"""The ``synomaly`` command: detect, train, evaluate, demo. The same engine calls as in Slicer; each command's
options and work live in its own module."""
import argparse
import sys
from typing import List, Optional

from synomaly.commands import demo, detect, evaluate, train
from synomaly.commands.terminal import error_line, log_as_warnings
from synomaly.errors import SynomalyError
from synomaly.inference.threads import use_cpu_share


def build_parser() -> argparse.ArgumentParser:
    from synomaly import __version__

    parser = argparse.ArgumentParser(prog="synomaly", description="Unsupervised anomaly detection in medical "
                                     "volumes with Synomaly noise and multi-stage diffusion.")
    parser.add_argument("--version", action="version", version=f"synomaly {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (detect, train, evaluate, demo):
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    log_as_warnings()
    try:
        if getattr(args, "threads", None) is not None or args.command in ("detect", "train", "evaluate", "demo"):
            use_cpu_share(getattr(args, "threads", None))
        return args.func(args)
    except SynomalyError as exc:
        print(error_line(str(exc)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("synomaly: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
