"""`subjective keys create|revoke|list`: manage API keys (REDIS_URL, else SQLite)."""

from __future__ import annotations

import argparse
import sys

from subjective.server.keys import BUDGET_PERIODS, ApiKey, new_secret, open_key_store


def register(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser("keys", help="manage API keys")
    commands = keys.add_subparsers(dest="keys_command", required=True)
    create = commands.add_parser("create", help="create a key; its secret is shown only once")
    create.add_argument("--name", required=True)
    create.add_argument("--admin", action="store_true", help="may read all usage, set threshold")
    create.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    create.add_argument("--flops-budget", type=_flops, help="executed FLOPs per period, e.g. 5e15")
    create.add_argument("--budget-period", choices=BUDGET_PERIODS, default="day")
    create.set_defaults(handler=create_key)
    revoke = commands.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=revoke_key)
    listing = commands.add_parser("list", help="list keys (never their secrets)")
    listing.set_defaults(handler=list_keys)
    secret = commands.add_parser(
        "new-secret", help="print a fresh secret for `serve --admin-key-file`; stores nothing"
    )
    secret.set_defaults(handler=print_new_secret)


def create_key(args: argparse.Namespace) -> int:
    store = open_key_store()
    try:
        created = store.create(
            args.name, args.admin, args.rpm, args.flops_budget, args.budget_period
        )
    finally:
        store.close()
    print(f"id:     {created.key.id}")
    print(f"secret: {created.secret}")
    print("The secret is shown only this once; only its hash is stored.", file=sys.stderr)
    return 0


def revoke_key(args: argparse.Namespace) -> int:
    store = open_key_store()
    try:
        revoked = store.revoke(args.key_id)
    finally:
        store.close()
    if not revoked:
        print(f"no active key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def list_keys(args: argparse.Namespace) -> int:
    store = open_key_store()
    try:
        keys = store.list()
    finally:
        store.close()
    print("id\tname\tadmin\trpm\tflops_budget\tperiod\tcreated_at\tstatus")
    for key in keys:
        print("\t".join(_columns(key)))
    return 0


def print_new_secret(args: argparse.Namespace) -> int:
    print(new_secret())
    return 0


def _columns(key: ApiKey) -> list[str]:
    status = "active" if key.active else f"revoked {key.revoked_at:%Y-%m-%dT%H:%M:%SZ}"
    return [
        key.id,
        key.name,
        "yes" if key.admin else "no",
        "-" if key.rpm is None else str(key.rpm),
        "-" if key.flops_budget is None else str(key.flops_budget),
        key.budget_period,
        f"{key.created_at:%Y-%m-%dT%H:%M:%SZ}",
        status,
    ]


def _flops(text: str) -> int:
    """An integer FLOP count; accepts 5e15 or 5000000000000000."""
    from decimal import Decimal, InvalidOperation

    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"not a whole, non-negative FLOP count: {text!r}")
    return int(value)
