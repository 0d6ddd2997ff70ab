"""Start TorchServe and wait until the models' workers are READY, or stop it.

    python -m scripts.serve start --models scenes=scenes.mar [--timeout 180]
    python -m scripts.serve start --restore      # models, versions, workers as at the last stop
    python -m scripts.serve stop

The server runs from ``--workdir`` (default: the repository root), where TorchServe writes
``key_file.json`` (the API keys) and ``logs/``. On a timeout the log tail is printed, the
server is stopped and the exit code is 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.server import (ROOT, ServerError, TorchServe, model_names, remove_empty_model_dirs,
                            restored_models, stop_pid_file)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=["start", "stop"])
    p.add_argument("--models", nargs="*", default=[], help="NAME=FILE.mar from the model store")
    p.add_argument("--workdir", type=Path, default=ROOT, help="server working directory")
    p.add_argument("--config", type=Path, default=ROOT / "config.properties")
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--restore", action="store_true",
                   help="start from the last snapshot in <workdir>/logs/config instead of --models")
    p.add_argument("--timeout", type=float, default=300.0, help="s to wait for READY workers")
    return p


def main(args) -> int:
    if args.command == "stop":
        stopped = stop_pid_file(Path(args.workdir) / "torchserve.pid")
        remove_empty_model_dirs(args.workdir)
        print("TorchServe stopped" if stopped else "TorchServe was not running (no torchserve.pid)")
        return 0
    if (Path(args.workdir) / "torchserve.pid").is_file():
        stop_pid_file(Path(args.workdir) / "torchserve.pid")
    server = TorchServe(workdir=args.workdir, config=args.config, model_store=args.model_store,
                        models=args.models, restore=args.restore)
    try:
        server.start()
        server.wait_ready(restored_models(server.last_snapshot()) if args.restore else model_names(args.models),
                          timeout_s=args.timeout)
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        return 1
    print(f"TorchServe ready: inference {server.url('inference')}, management "
          f"{server.url('management')}, metrics {server.url('metrics')}; keys in "
          f"{server.workdir / 'key_file.json'}; logs in {server.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
