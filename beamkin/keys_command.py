"""`beamkin keys`: create CURVE key pairs for the sockets between hosts (beamkin/security.py;
deploy/README.md, "Running across hosts securely")."""

from __future__ import annotations

import argparse
import sys

from beamkin import security


def run_keys(args: argparse.Namespace) -> int:
    """Create DIR/NAME.key (public) and DIR/NAME.key_secret (secret) per name; exit 2 naming the
    problem (an existing pair, a bad name, a folder that cannot be written)."""
    for name in args.names:
        try:
            public, secret = security.create_keys(args.dir, name, overwrite=args.force)
        except (OSError, ValueError) as exc:
            print(f"beamkin keys: {exc}", file=sys.stderr)
            return 2
        print(f"{name}: public key {public} (give it to peers: server_key, or a clients folder)")
        print(f"{name}: secret key {secret} (this stage's [security] secret_key; keep it on its host, readable by it only)")
    return 0


def add_keys_command(commands) -> None:
    """Add ``keys`` to the subcommands of the ``beamkin`` parser."""
    keys = commands.add_parser(
        "keys", allow_abbrev=False,
        help="create CURVE key pairs for the sockets between hosts (deploy/README.md, 'Running across hosts securely')",
        description="Create a CURVE key pair per name: DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 600). "
                    "Name a stage's secret file in [security] secret_key, the binding stage's public file in "
                    "[security.ENDPOINT] server_key, and copy the clients' public files into the folder named in "
                    "[security.ENDPOINT] clients.")
    keys.add_argument("names", nargs="+", metavar="NAME", help="name of the key pair (a stage or host: streamer, analysis)")
    keys.add_argument("--dir", required=True, metavar="DIR", help="folder for the key files (created)")
    keys.add_argument("--force", action="store_true", help="replace an existing pair of the same name")
    keys.set_defaults(func=run_keys)
