"""KServe: build an InferenceService's storage and manifests from an archive; validate manifests.

    python -m scripts.kserve storage --model intel-scenes [--storage-uri s3://bucket/intel-scenes]
        [--image registry/ts-image-classifier:cpu] [--gpu] [--out build/kserve]
    .venv-kserve/bin/python -m scripts.kserve validate build/kserve/servingruntime.yaml \
        build/kserve/intel-scenes/inferenceservice.yaml

``storage`` writes ``<out>/<model>/{config/config.properties, model-store/<model>.mar}`` (upload
it to the storage URI) and the two manifests (``serving/kserve.py``). ``validate`` checks each
manifest against the KServe Python SDK's models (unknown keys, types, required fields), and a
ServingRuntime against each InferenceService given with it; it runs in ``.venv-kserve``, which
``make setup`` creates. Exit code 1 on any error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from serving.server import ROOT


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("storage", help="storage layout and manifests for model_store/<model>.mar",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--model", required=True, help="archive name in the model store")
    s.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    s.add_argument("--out", type=Path, default=ROOT / "build" / "kserve")
    s.add_argument("--storage-uri", default=None,
                   help="the InferenceService's storageUri (default pvc://model-store/<model>)")
    s.add_argument("--image", default="ts-image-classifier:cpu",
                   help="the ServingRuntime's image (built from the Dockerfile)")
    s.add_argument("--gpu", action="store_true", help="one nvidia.com/gpu for the predictor")
    v = sub.add_parser("validate", help="check manifests against the KServe SDK's models")
    v.add_argument("manifests", nargs="+", type=Path)
    return p


def validate_files(paths: list[Path]) -> list[str]:
    """Errors of every document in ``paths``, prefixed with its file; pairs every
    ServingRuntime with every InferenceService given."""
    import yaml

    from serving.kserve_schema import check_pair, validate

    errors, runtimes, services = [], [], []
    for path in paths:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            found = validate(doc)
            errors += [f"{path}: {e}" for e in found]
            if not found:
                kind = doc["kind"]
                (runtimes if kind.endswith("ServingRuntime") else services).append(doc)
    errors += [f"{s['metadata']['name']} on {r['metadata']['name']}: {e}"
               for r in runtimes for s in services for e in check_pair(r, s)]
    return errors


def main(args) -> int:
    if args.command == "validate":
        errors = validate_files(args.manifests)
        for e in errors:
            print(e, file=sys.stderr)
        print(f"{len(args.manifests)} file(s): {len(errors)} error(s)")
        return 1 if errors else 0
    from serving.kserve import build_storage

    root = build_storage(args.model_store, args.model, args.out, args.storage_uri, args.image, args.gpu)
    print(f"storage: {root} (upload config/ and model-store/ to the storage URI)\n"
          f"manifests: {args.out / 'servingruntime.yaml'} {root / 'inferenceservice.yaml'}\n"
          f"then: kubectl apply -f {args.out / 'servingruntime.yaml'} -f {root / 'inferenceservice.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
