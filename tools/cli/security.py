"""`lookalike token`: the bearer tokens of a router's tokens file (create, list, revoke), written so only their owner
can read them.

May use: the base package (lookalike) and tools.cli.common and tools.cli.flags.
"""

from __future__ import annotations

import json
import os
import pathlib

from lookalike.errors import InvalidArgument
from lookalike.security import SCOPES, new_token, parse_tokens, token_hash
from tools.cli.common import UserError, os_error
from tools.cli.flags import non_negative_int, number


def _write_private(path: pathlib.Path, text: str) -> None:
    """Writes a file only its owner can read, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        err.filename = str(path)  # not the temporary file's name
        raise UserError(f"cannot write {os_error(err)}") from None


_TOKEN_EXAMPLE = "lookalike token create ci --scopes read,write --tokens tokens.json --out ci.token"


def cmd_token(args) -> int:
    path = pathlib.Path(args.tokens)
    if args.action == "create" and (not args.name or args.scopes is None):
        missing = " and ".join(w for w, gone in (("a NAME (who holds it)", not args.name),
                                                 ("--scopes", args.scopes is None)) if gone)
        raise UserError(f"token create needs {missing}, e.g. `{_TOKEN_EXAMPLE}` (scopes: {', '.join(SCOPES)}; "
                        f"--tokens: the tokens file `lookalike serve --tokens` reads; --out: where the token goes)")
    if args.action != "create" and not path.exists():
        raise UserError(f"no tokens file {str(path)!r} (--tokens FILE names it; `{_TOKEN_EXAMPLE}` makes one)", 1)
    try:
        text = path.read_text() if path.exists() else '{"tokens": []}'
        parse_tokens(text, f"tokens file {str(path)!r}")  # checks every entry
    except (OSError, InvalidArgument) as err:
        raise UserError(os_error(err, "--tokens") if isinstance(err, OSError) else str(err)) from None
    entries = json.loads(text)["tokens"]
    if args.action == "list":
        for e in entries:
            extra = f"\trate={e['rate']}/s" if e.get("rate") else ""
            print(f"{e['name']}\t{','.join(e['scopes'])}{extra}")
        return 0
    if args.action == "revoke":
        kept = [e for e in entries if e["name"] != args.name]
        if len(kept) == len(entries):
            names = ", ".join(e["name"] for e in entries) or "none"
            raise UserError(f"no token named {args.name!r} in {path} (its tokens: {names})", 1)
        _write_private(path, json.dumps({"tokens": kept}, indent=1) + "\n")
        print(f"revoked {args.name} (a router re-reads {path} within seconds)")
        return 0
    scopes = sorted({s.strip() for s in args.scopes.split(",") if s.strip()})
    if not scopes or any(s not in SCOPES for s in scopes):
        raise UserError(f"--scopes takes a comma-separated list of {', '.join(SCOPES)} (e.g. --scopes read,write), "
                        f"got {args.scopes!r}")
    if any(e["name"] == args.name for e in entries):
        raise UserError(f"a token named {args.name!r} exists in {path}; revoke it first (`lookalike token revoke "
                        f"{args.name} --tokens {path}`) or pick another name", 1)
    token = new_token()
    entry = {"name": args.name, "scopes": scopes, "sha256": token_hash(token).removeprefix("sha256:")}
    if args.rate:
        entry["rate"] = args.rate
    if args.burst:
        entry["burst"] = args.burst
    # the token first: a hash in the tokens file whose token could not be written would be of no use
    if args.out:
        _write_private(pathlib.Path(args.out), token + "\n")
    _write_private(path, json.dumps({"tokens": [*entries, entry]}, indent=1) + "\n")
    if args.out:
        print(f"token {args.name} ({','.join(scopes)}) written to {args.out}; its hash added to {path}")
    else:
        print(token)
    return 0


def add_token(sub) -> None:
    """The `token` subcommand and its actions."""
    t = sub.add_parser("token", help="bearer tokens of a router's tokens file: create, list, revoke",
                       description=f"Bearer tokens of a router's tokens file (`lookalike serve --tokens FILE`), e.g. "
                                   f"`{_TOKEN_EXAMPLE}`, then `lookalike status --token-file ci.token`.")
    tsub = t.add_subparsers(dest="action", required=True, metavar="ACTION")
    tc = tsub.add_parser("create", help="a new random token: its SHA-256 goes into the tokens file, the token to "
                         "--out (or stdout)", epilog=f"example: {_TOKEN_EXAMPLE}")
    tc.add_argument("name", nargs="?", help="who holds it (shown in logs and errors, never the token); required")
    tc.add_argument("--scopes", default=None, help="required: comma-separated read (search, get, status), write "
                    "(upsert, delete), admin (collections, rebalance, jobs; grants every scope)")
    tc.add_argument("--rate", type=number(float, low=0), default=0.0,
                    help="requests per second for this token (default 0: the server's --rate-limit)")
    tc.add_argument("--burst", type=non_negative_int, default=0,
                    help="requests at once above --rate (default 0: the server's)")
    tc.add_argument("--out", default=None, metavar="FILE",
                    help="write the token to this file (mode 600); default: print it on stdout")
    tsub.add_parser("list", help="the tokens' names, scopes and rates")
    tsub.add_parser("revoke", help="remove a token (routers re-read the file within seconds)").add_argument(
        "name", help="the token's name")
    for tp in tsub.choices.values():
        tp.add_argument("--tokens", default=os.environ.get("LOOKALIKE_TOKENS_FILE", "lookalike-tokens.json"),
                        metavar="FILE", help="the tokens file (env LOOKALIKE_TOKENS_FILE; default %(default)s)")
    t.set_defaults(func=cmd_token)
