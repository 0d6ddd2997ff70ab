"""Serve the page for people (upload photos, top-k bars, where the model looked) on loopback.

    python -m scripts.page [--examples ../shared/data/intel-scenes/test] [--port 8090]

The page talks to its own server only; that server calls the running TorchServe (addresses from
``--config``, keys from ``<workdir>/key_file.json``, read at each call) and never hands a key
to the browser. ``make page MODEL=intel-scenes`` starts it with the model's held-out photos
as examples (``serving/page.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.page import PageConfig, create_app
from serving.server import ROOT, read_properties

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "config.properties",
                   help="TorchServe's config.properties (its API addresses)")
    p.add_argument("--workdir", type=Path, default=ROOT, help="TorchServe's working directory (key_file.json)")
    p.add_argument("--examples", type=Path, default=None,
                   help="folder of example photos (an ImageFolder split: labelled by folder)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback unless --public)")
    p.add_argument("--public", action="store_true",
                   help="allow a non-loopback --host (put an authenticating proxy in front)")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--max-files", type=int, default=8, help="most photos one upload may carry")
    p.add_argument("--max-file-mb", type=float, default=10.0, help="largest photo, MiB")
    p.add_argument("--topk", type=int, default=3, help="k the page starts with")
    return p


def page_config(args) -> PageConfig:
    """The page's settings from the arguments and TorchServe's config.properties."""
    props = read_properties(args.config)
    return PageConfig(inference_url=props.get("inference_address", "http://127.0.0.1:8080"),
                      management_url=props.get("management_address", "http://127.0.0.1:8081"),
                      key_file=Path(args.workdir) / "key_file.json",
                      examples=args.examples if args.examples and args.examples.exists() else None,
                      max_files=args.max_files, max_file_bytes=int(args.max_file_mb * 1024 * 1024),
                      default_topk=args.topk)


def main(args) -> int:
    if args.host not in LOOPBACK and not args.public:
        print(f"refusing to bind {args.host}: the page holds TorchServe's keys; pass --public "
              "behind an authenticating proxy", file=sys.stderr)
        return 2
    config = page_config(args)
    print(f"page on http://{args.host}:{args.port}/ -> TorchServe {config.inference_url}")
    create_app(config).run(host=args.host, port=args.port, threaded=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
