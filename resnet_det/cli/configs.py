"""``resnet-det configs``: the shipped configs, by the name the other subcommands accept.

    resnet-det configs                 # every config: NAME  description (the file's first comment line)
    resnet-det configs shapes          # those whose name contains "shapes"
    resnet-det configs --paths         # NAME  file

``resnet-det train NAME`` (or ``eval`` / ``infer``) takes a name as it is printed here, with or without
``.yaml``; ``resnet-det train NAME --print-config`` prints it resolved (``_base_`` and overrides
applied), a starting point for a config of your own.
"""

from __future__ import annotations

import argparse
import sys

from resnet_det.config_files import config_description, configs_root, shipped_configs

HELP = "list the shipped configs (names for train / eval / infer) with a one-line description each"


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The parser of ``configs``."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("filter", nargs="?", default="", metavar="TEXT", help="only the names that contain TEXT")
    p.add_argument("--paths", action="store_true", help="print each config's file instead of its description")
    return p


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Prints one line per shipped config; returns 0 (1 when the filter matches none)."""
    configs = {n: p for n, p in shipped_configs().items() if args.filter.lower() in n.lower()}
    if not configs:
        print(f"{parser.prog}: no shipped config name contains {args.filter!r} (folder {configs_root()})",
              file=sys.stderr)
        return 1
    width = max(len(n) for n in configs)
    for name, path in configs.items():
        print(f"{name:<{width}}  {path if args.paths else config_description(path)}".rstrip())
    return 0
