"""A client of TorchServe's gRPC inference API (``Predictions``), without generated stubs.

    python -m serving.grpc_client --address 127.0.0.1:7070 --model intel-scenes photo.jpg
        [--key-file key_file.json] [--version 1.0]

TorchServe 0.12 serves ``org.pytorch.serve.grpc.inference.InferenceAPIsService`` on
``grpc_inference_port`` (config.properties: 7070): ``Predictions(PredictionsRequest) returns
(PredictionResponse)``. The two messages are declared here as a protobuf descriptor instead of
compiling TorchServe's ``inference.proto`` with ``grpc_tools.protoc``. protobuf's
``message_factory`` makes the classes and does the encoding; only the field numbers are
ours, and they match the wire format of that file (frontend/server/src/main/resources/proto/):

* ``PredictionsRequest``: ``string model_name = 1; string model_version = 2;
  map<string, bytes> input = 3;``. The frontend passes each map entry to the handler as one
  field of the request row, so ``{"data": <JPEG bytes>}`` arrives as ``row["data"]``, as an
  HTTP body does.
* ``PredictionResponse``: ``bytes prediction = 1``, the handler's answer (our JSON).

With token authorization on (the default), send the inference key as ``authorization: Bearer
<key>`` metadata, as over HTTP. A handler error (a 4xx of ours) comes back as a gRPC error
whose details hold our JSON message (``grpc.RpcError``; ``code()``, ``details()``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from serving.server import read_key

PACKAGE = "org.pytorch.serve.grpc.inference"
PREDICTIONS = f"/{PACKAGE}.InferenceAPIsService/Predictions"


def _message_classes():
    """(PredictionsRequest, PredictionResponse) classes from a descriptor built here."""
    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="ts_inference_client.proto", package=PACKAGE,
                                               syntax="proto3")
    request = proto.message_type.add(name="PredictionsRequest")
    request.field.add(name="model_name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    request.field.add(name="model_version", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry = request.nested_type.add(name="InputEntry")  # what protoc makes of a map field
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    request.field.add(name="input", number=3, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                      type_name=f".{PACKAGE}.PredictionsRequest.InputEntry")
    response = proto.message_type.add(name="PredictionResponse")
    response.field.add(name="prediction", number=1, type=F.TYPE_BYTES, label=F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return (message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in ("PredictionsRequest", "PredictionResponse"))


PredictionsRequest, PredictionResponse = _message_classes()


def predict(channel: grpc.Channel, model: str, data: bytes, *, key: Optional[str] = None,
            version: str = "", timeout: float = 60.0) -> bytes:
    """One ``Predictions`` call.

    Args:
        channel: e.g. ``grpc.insecure_channel("127.0.0.1:7070")``.
        model: the registered model name.
        data: the request body, e.g. a JPEG file's bytes.
        key: the inference key (``key_file.json``), or None with token authorization off.
        version: a model version, or "" for the default one.
        timeout: seconds.

    Returns:
        The handler's answer (``PredictionResponse.prediction``; our JSON top-k list).

    Raises:
        grpc.RpcError: the call failed (unknown model, a 4xx of the handler, a timeout).
    """
    call = channel.unary_unary(PREDICTIONS, request_serializer=PredictionsRequest.SerializeToString,
                               response_deserializer=PredictionResponse.FromString)
    request = PredictionsRequest(model_name=model, model_version=version, input={"data": data})
    metadata = [("authorization", f"Bearer {key}")] if key else None
    return call(request, timeout=timeout, metadata=metadata).prediction


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--address", default="127.0.0.1:7070", help="grpc_inference address:port")
    p.add_argument("--model", required=True)
    p.add_argument("--version", default="", help="model version (default: the default version)")
    p.add_argument("--key-file", type=Path, default=Path("key_file.json"),
                   help="TorchServe's key file (the inference key); skipped if missing")
    args = p.parse_args(argv)
    key = read_key(args.key_file, "inference")  # None without the file
    failed = 0
    with grpc.insecure_channel(args.address) as channel:
        for image in args.images:
            try:
                answer = predict(channel, args.model, image.read_bytes(), key=key,
                                 version=args.version)
                print(f"{image}: {answer.decode()}")
            except grpc.RpcError as exc:
                failed += 1
                print(f"{image}: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
