"""`edge-agent keys generate|show` and `edge-agent model sign`: the operator's signing keys and signed models.

These run on the operator's machine: the private key never goes to a board. A board trusts the public
keys listed in its config file's ``model.trusted_keys`` (agent/signing.py, docs/operations.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from agent.cli.config_cmd import add_group
from agent.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ksub = add_group(sub, "keys", "operator signing keys (Ed25519) for models and shadow changes")
    g = ksub.add_parser("generate", help="write a new private key (0600) and its public key (KEY.pub)")
    g.add_argument("key", type=Path, metavar="KEY", help="the private key file to create (never overwritten)")
    g.set_defaults(handler=_generate)
    s = ksub.add_parser("show", help="print the public key and key id of a private or public key file")
    s.add_argument("key", type=Path, metavar="KEY")
    s.set_defaults(handler=_show)


def register_sign(msub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`edge-agent model sign` (registered by agent.cli.model_cmd)."""
    s = msub.add_parser("sign", help="sign a model file: writes FILE.sig, the manifest boards check before loading")
    s.add_argument("file", type=Path, metavar="FILE")
    s.add_argument("--key", type=Path, required=True, metavar="KEY", help="the operator's private key")
    s.add_argument(
        "--version",
        type=int,
        default=None,
        metavar="N",
        help="release number: a board never moves to a lower one (rollback protection)",
    )
    s.add_argument(
        "--expires",
        default=None,
        metavar="TIME",
        help="UTC time after which boards refuse the signature, YYYY-MM-DDTHH:MM:SSZ",
    )
    s.add_argument(
        "--downgrade",
        action="store_true",
        help="allow boards running a higher version to move to this one (needs --expires)",
    )
    s.add_argument("--output", type=Path, default=None, help="where to write the manifest (default FILE.sig)")
    s.set_defaults(handler=_sign)


def _generate(args: argparse.Namespace) -> int:
    from agent.signing import generate_key, key_id, parse_public_key

    try:
        pub_path, public = generate_key(args.key)
    except FileExistsError:
        print(f"edge-agent: {args.key} exists; a key is never overwritten", file=sys.stderr)
        return EXIT_USAGE
    print(f"private key  {args.key} (mode 0600: keep it off the boards)")
    print(f"public key   {pub_path}")
    print(f"key id       {key_id(parse_public_key(public))}")
    print(f'add to each board\'s config file: [model] trusted_keys = ["{public}"]')
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from agent.signing import key_id, load_private_key, parse_public_key, public_key_text

    text = args.key.read_text(errors="replace").strip()
    public = parse_public_key(text) if text.startswith("ed25519:") else load_private_key(args.key).public_key()
    print(f"{public_key_text(public)}  key id {key_id(public)}")
    return EXIT_OK


def _sign(args: argparse.Namespace) -> int:
    from agent.signing import load_private_key, sign_model
    from agent.system.files import file_sha256

    if args.downgrade and args.expires is None:
        print("edge-agent: --downgrade needs --expires: a downgrade permit must not hold forever", file=sys.stderr)
        return EXIT_USAGE
    if not args.file.is_file():
        print(f"edge-agent: {args.file}: no such file", file=sys.stderr)
        return EXIT_FAILURE
    key = load_private_key(args.key)
    t0 = time.monotonic()
    try:
        manifest = sign_model(
            args.file,
            key,
            sha256=file_sha256(args.file),
            version=args.version,
            expires=args.expires,
            downgrade=args.downgrade,
        )
    except ValueError as e:
        print(f"edge-agent: {e}", file=sys.stderr)
        return EXIT_USAGE
    out = args.output or args.file.with_name(args.file.name + ".sig")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out)
    s = manifest["signed"]
    print(
        f"signed {s['file']} ({s['size']} bytes, sha256 {s['sha256'][:16]}..., version {s['version']}) with key "
        f"{manifest['key_id']} in {time.monotonic() - t0:.2f} s -> {out}"
    )
    return EXIT_OK
