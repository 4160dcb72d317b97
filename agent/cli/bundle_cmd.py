"""`edge-agent bundle ...`: the offline aarch64 bundle, as `python3 packaging/bundle.py ...` writes it.

A thin wrapper: every argument goes to packaging/bundle.py's main, so the options and the help are that
script's own. It runs from a checkout of the repository only (an editable install, as `.ci/setup` makes):
the bundle holds edge-agent's wheel built from the checkout's git HEAD and llama-cpp-python cross-compiled
by packaging/build-llama-aarch64.sh, none of which an installed wheel carries.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import agent
from agent.errors import EXIT_FAILURE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    # prefix_chars="+": this parser takes no options of its own, so "--python 3.13", "--help" ... stay
    # arguments and reach bundle.py's parser (argparse.REMAINDER alone stops at a leading option).
    p = sub.add_parser(
        "bundle",
        add_help=False,
        prefix_chars="+",
        help="write the offline install bundle for 64-bit ARM boards (packaging/bundle.py; --help for its options)",
        description="Runs packaging/bundle.py of this checkout with the arguments given.",
    )
    p.add_argument("bundle_args", nargs=argparse.REMAINDER, metavar="ARGUMENTS OF packaging/bundle.py")
    p.set_defaults(handler=_bundle)


def bundle_script(package_dir: Path | None = None) -> Path | None:
    """packaging/bundle.py next to the agent package when it runs from a checkout; None from a wheel."""
    checkout = (package_dir or Path(agent.__file__).resolve().parent).parent
    script = checkout / "packaging" / "bundle.py"
    return script if script.is_file() and (checkout / "pyproject.toml").is_file() else None


def _bundle(args: argparse.Namespace) -> int:
    script = bundle_script()
    if script is None:
        print(
            f"edge-agent: 'bundle' runs from a checkout of the repository: this edge-agent is installed from a "
            f"wheel ({Path(agent.__file__).resolve().parent}), which has no packaging/ folder. The bundle is built "
            "from a checkout's git HEAD with its packaging scripts: clone the repository, run .ci/setup, then "
            "`.venv/bin/edge-agent bundle` (or `python3 packaging/bundle.py`) there.",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    spec = importlib.util.spec_from_file_location("edge_agent_packaging_bundle", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(args.bundle_args), prog="edge-agent bundle"))
