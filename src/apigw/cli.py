"""The `apigw` command: tooling that works while no gateway runs.

It reads the configuration and the environment with the gateway's own
loader, and manages keys through the gateway's own key store and admin JSON
shapes, so its answers are the admin API's. Every failure is one line on
stderr and exit status 1, as for `twistd apigw`.
"""

import argparse
import json
import os
import sys
from importlib import resources

from apigw import __version__
from apigw.config import ConfigError, load_config

DEFAULT_CONFIG = "gateway_config.yaml"


class CommandError(Exception):
    """A failure to print as `apigw: <message>`."""


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    if args.run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except (CommandError, ConfigError) as e:
        sys.stderr.write(f"apigw: {e}\n")
        return 1


def _parser():
    parser = argparse.ArgumentParser(
        prog="apigw", description="Check the configuration and manage API keys for apigw.")
    parser.set_defaults(run=None)
    parser.add_argument("--version", action="version", version=f"apigw {__version__}")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", "-c", default=DEFAULT_CONFIG, metavar="PATH",
                        help=f"the gateway's YAML configuration (default: {DEFAULT_CONFIG})")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    check = commands.add_parser(
        "check", parents=[config],
        help="validate the configuration and environment; print the effective configuration")
    check.set_defaults(run=_check)

    version = commands.add_parser("version", help="print the apigw version")
    version.set_defaults(run=_version)

    init = commands.add_parser("init", help="write a starter configuration file")
    init.add_argument("path", nargs="?", default=DEFAULT_CONFIG, metavar="PATH",
                      help=f"where to write it (default: {DEFAULT_CONFIG}); never overwritten")
    init.set_defaults(run=_init)

    keys = commands.add_parser("keys", help="create, list and revoke API keys in DATABASE_URL")
    keys.set_defaults(run=lambda args: keys.print_help(sys.stderr) or 2)
    key_commands = keys.add_subparsers(title="key commands", metavar="COMMAND")
    create = key_commands.add_parser("create", parents=[config], help="create a key")
    create.add_argument("--owner", required=True, help="who the key is for")
    create.add_argument("--services", type=_names, metavar="A,B",
                        help="the services the key may call (default: every service)")
    create.add_argument("--expires-in", type=_number, metavar="SECONDS",
                        help="the key expires this long from now (default: never)")
    create.add_argument("--rate-limit", type=int, metavar="N",
                        help="requests per rate_period for this key (default: the service's)")
    create.set_defaults(run=_keys_create)
    listing = key_commands.add_parser("list", parents=[config], help="list every key")
    listing.set_defaults(run=_keys_list)
    revoke = key_commands.add_parser("revoke", parents=[config], help="revoke a key")
    revoke.add_argument("id", help="the key's id")
    revoke.set_defaults(run=_keys_revoke)
    return parser


def _names(text):
    return [name.strip() for name in text.split(",") if name.strip()]


def _number(text):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None


def _load(args):
    return load_config(args.config, environ=os.environ)


def _print_json(value):
    print(json.dumps(value, indent=2))


# --- commands ---------------------------------------------------------------------

def _version(args):
    print(f"apigw {__version__}")


def _check(args):
    from apigw.effective import effective_config_yaml

    sys.stdout.write(effective_config_yaml(_load(args)))


def _init(args):
    starter = resources.files("apigw").joinpath("starter_config.yaml").read_bytes()
    try:
        with open(args.path, "xb") as f:
            f.write(starter)
    except FileExistsError:
        raise CommandError(f"{args.path} already exists; not overwriting it") from None
    except OSError as e:
        raise CommandError(f"{args.path}: cannot write: {e.strerror or e}") from None
    print(f"wrote {args.path}; `apigw check --config {args.path}` shows every field")


def _keys_create(args):
    from apigw.admin import AdminError, created_key_json, key_spec

    config = _load(args)
    body = {"owner": args.owner, "services": args.services, "expires_in": args.expires_in,
            "rate_limit": args.rate_limit}
    try:
        spec = key_spec({k: v for k, v in body.items() if v is not None}, set(config.services))
    except AdminError as e:
        raise CommandError(e.message) from None

    async def create(store, now):
        record, raw_key = await store.create_key(**spec)
        return created_key_json(record, raw_key, now)

    _print_json(_with_key_store(config, create))


def _keys_list(args):
    from apigw.admin import key_list_json

    async def listing(store, now):
        return key_list_json(await store.list_keys(), now)

    _print_json(_with_key_store(_load(args), listing))


def _keys_revoke(args):
    async def revoke(store, now):
        if not await store.revoke_key(args.id):
            raise CommandError(f"no API key has the id {args.id!r}")
        return (await store.get_key(args.id)).to_json(now)

    _print_json(_with_key_store(_load(args), revoke))


def _with_key_store(config, operation):
    """Run `await operation(store, now)` on a started KeyStore, under a reactor
    that lives only as long as the operation: the store is adbapi-based."""
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    from apigw.keys import KeyStore, KeyStoreUnavailable, SchemaTooNew

    outcome = {}

    async def run(reactor):
        store = KeyStore(config.env.database_url, reactor)
        try:
            await store.start()
            outcome["value"] = await operation(store, reactor.seconds())
        except KeyStoreUnavailable as e:
            outcome["error"] = CommandError(f"the key store is unavailable: {e}")
        except SchemaTooNew as e:
            outcome["error"] = CommandError(str(e))
        except CommandError as e:
            outcome["error"] = e
        finally:
            await store.stop()

    try:
        task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        # react always exits; a failure other than ours already printed its traceback.
        if e.code not in (0, None) and not outcome:
            raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
