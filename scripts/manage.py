"""Model lifecycle through TorchServe's management API: register, scale, version, unregister.

    python -m scripts.manage list
    python -m scripts.manage describe NAME [VERSION|all]
    python -m scripts.manage register NAME_V2.mar [--workers 1 --batch-size 8 --max-batch-delay 20]
    python -m scripts.manage scale NAME [--version V] --min-workers 3 [--max-workers 3]
    python -m scripts.manage set-default NAME VERSION
    python -m scripts.manage unregister NAME [VERSION]
    python -m scripts.manage renew-key inference|management

Reads the management key from TorchServe's ``key_file.json`` (token authorization) and the
address from ``config.properties``. Exits 1, printing the server's message, when a call fails.
All changes are synchronous: the command returns once TorchServe has applied them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import requests

from serving.management import Management, ManagementError, format_description
from serving.server import ROOT, read_key, read_properties


def main(args) -> int:
    props = read_properties(args.config)
    api = Management(args.url or props["management_address"],
                     read_key(args.key_file, "API" if args.command == "renew-key" else "management"))
    try:
        if args.command == "list":
            models = api.list()
            for m in models:
                print(f"{m['modelName']:<24} {m['modelUrl']}")
            if not models:
                print("no models registered")
        elif args.command == "describe":
            default = api.describe(args.name)[0]["modelVersion"]
            versions = api.describe(args.name, args.version)
            print(format_description(versions, default))
        elif args.command == "register":
            print(api.register(args.mar, workers=args.workers, batch_size=args.batch_size,
                               max_batch_delay=args.max_batch_delay,
                               response_timeout=args.response_timeout)["status"])
        elif args.command == "scale":
            print(api.scale(args.name, args.min_workers, args.max_workers, args.version)["status"])
        elif args.command == "set-default":
            print(api.set_default(args.name, args.version)["status"])
        elif args.command == "unregister":
            print(api.unregister(args.name, args.version)["status"])
        elif args.command == "renew-key":
            api.renew_key(args.api)
            print(f"new {args.api} key written to {args.key_file} (valid for "
                  f"token_expiration_min = {props.get('token_expiration_min', '60')} min)")
    except ManagementError as exc:
        print(f"error: {args.command} failed: {exc}", file=sys.stderr)
        return 1
    except requests.ConnectionError as exc:
        print(f"error: cannot reach the management API at {api.url}: {exc}", file=sys.stderr)
        return 1
    return 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default=None, help="management API (default: from --config)")
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--key-file", type=Path, default=ROOT / "key_file.json")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered models")
    d = sub.add_parser("describe", help="versions, batching and workers of a model")
    d.add_argument("name")
    d.add_argument("version", nargs="?", default=None, help="a version, or 'all'")
    r = sub.add_parser("register", help="register an archive from the model store")
    r.add_argument("mar", help="file name in the model store, e.g. scenes_v2.mar")
    r.add_argument("--workers", type=int, default=1, help="initial workers")
    r.add_argument("--batch-size", type=int, default=None, help="default: model-config.yaml")
    r.add_argument("--max-batch-delay", type=int, default=None, help="ms; default: model-config.yaml")
    r.add_argument("--response-timeout", type=int, default=None, help="s; default: model-config.yaml")
    s = sub.add_parser("scale", help="set a version's worker count")
    s.add_argument("name")
    s.add_argument("--version", default=None, help="default: the default version")
    s.add_argument("--min-workers", type=int, required=True)
    s.add_argument("--max-workers", type=int, default=None, help="default: --min-workers")
    sd = sub.add_parser("set-default", help="route /predictions/NAME to VERSION")
    sd.add_argument("name")
    sd.add_argument("version")
    u = sub.add_parser("unregister", help="remove a model version (or the default one)")
    u.add_argument("name")
    u.add_argument("version", nargs="?", default=None)
    k = sub.add_parser("renew-key", help="replace the inference or management key before it "
                                          "expires (uses the API key of --key-file)")
    k.add_argument("api", choices=["inference", "management"])
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
