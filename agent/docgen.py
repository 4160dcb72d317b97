"""Generated blocks in docs/: a document marks each block with ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->``, and a module renders each name from the code, so the document cannot
drift from it (a test compares). Used by ``agent.ops.protocol_doc`` and ``agent.telemetry.doc``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BLOCK_RE = re.compile(r"(<!-- BEGIN GENERATED: ([\w-]+) -->\n)(.*?)(<!-- END GENERATED: \2 -->)", re.S)


def cell(text: str) -> str:
    """``text`` as one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def schema_type(prop: dict[str, Any], sep: str = " \\| ") -> str:
    """A JSON Schema property's type in words (``sep`` between the alternatives of a union)."""
    if "$ref" in prop:
        return str(prop["$ref"]).rsplit("/", 1)[-1]
    if "enum" in prop:
        return sep.join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return sep.join(schema_type(p, sep) for p in prop["anyOf"])
    t = prop.get("type", "any")
    if t == "array":
        return f"array of {schema_type(prop.get('items', {}), sep)}"
    if t == "string" and prop.get("format") == "date-time":
        return "string (RFC 3339)"
    return str(t)


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


@dataclass(frozen=True)
class GeneratedDoc:
    """One document with generated blocks: ``render(text)`` brings them up to date, ``main(argv)`` is
    its ``python -m {module} [--check]``."""

    path: Path
    renderers: Callable[[], Mapping[str, Callable[[], str]]]
    module: str
    description: str

    def render(self, text: str) -> str:
        """The document with every generated block brought up to date."""
        return render_blocks(text, self.renderers(), f"docs/{self.path.name}")

    def main(self, argv: list[str] | None = None) -> int:
        return main(self.path, self.render, module=self.module, description=self.description, argv=argv)
