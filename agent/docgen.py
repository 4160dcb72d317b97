"""Generated blocks in docs/: a document marks each block with ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->``, and a module renders each name from the code, so the document cannot
drift from it (a test compares). Used by ``agent.ops.protocol_doc`` and ``agent.telemetry.doc``."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

_BLOCK_RE = re.compile(r"(<!-- BEGIN GENERATED: ([\w-]+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)


def render_blocks(text: str, renderers: Mapping[str, Callable[[], str]], doc_name: str) -> str:
    """``text`` with every generated block brought up to date; a block nothing renders, or a renderer
    without its block, is a ``KeyError`` naming ``doc_name``."""
    seen: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in renderers:
            raise KeyError(f"{doc_name} has a generated block {name!r} that nothing renders")
        seen.add(name)
        return f"{m.group(1)}{renderers[name]()}\n{m.group(4)}"

    out = _BLOCK_RE.sub(sub, text)
    missing = set(renderers) - seen
    if missing:
        raise KeyError(f"{doc_name} lacks the generated block(s) {sorted(missing)}")
    return out


def main(
    doc: Path, render: Callable[[str], str], *, module: str, description: str, argv: list[str] | None = None
) -> int:
    """``python -m {module} [--check]``: rewrite ``doc`` when it is out of date, or only say so."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--check", action="store_true", help="only report whether the document is up to date")
    args = ap.parse_args(argv)
    current = doc.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if wanted != current:
            print(f"{doc} is out of date: run python -m {module}", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        doc.write_text(wanted, encoding="utf-8")
        print(f"updated {doc}")
    return 0
