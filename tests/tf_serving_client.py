"""Drives a running aspire-server through TensorFlow Serving's published Python API
(PyPI tensorflow-serving-client-grpc: TF Serving's own generated protos and stubs),
the way TF Serving's MNIST tutorial client does.

Usage: python tf_serving_client.py HOST:PORT MNIST_CSV_GZ [--ca CA_PEM [--cert CERT_PEM --key KEY_PEM]]
With --ca the channel is TLS (grpc.ssl_channel_credentials, the server verified against
CA_PEM); with --cert and --key too, the client presents that certificate (mTLS).
Exits non-zero with a message on the first mismatch.
"""

import argparse
import gzip
import struct
import sys

import grpc
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)


def images(path, count):
    """The first `count` test images (every 5th row from index 4) as [0, 1] floats."""
    out = []
    with gzip.open(path, "rt") as f:
        for i, line in enumerate(f):
            if i % 5 == 4:
                values = line.strip().split(",")
                out.append(([int(v) / 255.0 for v in values[:784]], int(values[784])))
                if len(out) == count:
                    break
    return out


def image_tensor(pixels, as_content):
    t = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT)
    t.tensor_shape.dim.extend([tensor_shape_pb2.TensorShapeProto.Dim(size=1),
                               tensor_shape_pb2.TensorShapeProto.Dim(size=784)])
    if as_content:
        t.tensor_content = struct.pack("<784f", *pixels)
    else:
        t.float_val.extend(pixels)
    return t


def check(cond, message):
    if not cond:
        print("FAIL: " + message)
        sys.exit(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("server")
    parser.add_argument("data")
    parser.add_argument("--ca", help="PEM of the CA the server's certificate is signed by")
    parser.add_argument("--cert", help="client certificate (PEM), for mTLS")
    parser.add_argument("--key", help="client private key (PEM), for mTLS")
    args = parser.parse_args()
    server, data = args.server, args.data
    if args.ca:
        def read(path):
            with open(path, "rb") as f:
                return f.read()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca),
            private_key=read(args.key) if args.key else None,
            certificate_chain=read(args.cert) if args.cert else None,
        )
        channel = grpc.secure_channel(server, credentials)
    else:
        channel = grpc.insecure_channel(server)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    answers = {}
    for as_content in (False, True):
        correct = 0
        samples = images(data, 50)
        for pixels, label in samples:
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mnist"
            request.model_spec.signature_name = "predict_images"
            request.inputs["images"].CopyFrom(image_tensor(pixels, as_content))
            result = stub.Predict(request, 10.0)
            scores = list(result.outputs["scores"].float_val)
            check(len(scores) == 10, "expected 10 scores, got %d" % len(scores))
            check(abs(sum(scores) - 1.0) < 1e-3, "scores do not sum to 1: %r" % scores)
            check(result.model_spec.name == "mnist", "model_spec.name %r" % result.model_spec.name)
            check(result.model_spec.version.value == 1, "version %r" % result.model_spec.version.value)
            correct += int(max(range(10), key=lambda i: scores[i]) == label)
        answers[as_content] = correct
        check(correct >= 30, "only %d of 50 right with tensor_content=%s" % (correct, as_content))
    check(answers[False] == answers[True], "the two encodings disagree: %r" % answers)

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "mnist"
    request.metadata_field.append("signature_def")
    result = stub.GetModelMetadata(request, 10.0)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    check(result.metadata["signature_def"].Unpack(signature_map), "metadata is not a SignatureDefMap")
    sig = signature_map.signature_def["predict_images"]
    check(sig.inputs["images"].dtype == types_pb2.DT_FLOAT, "images dtype %r" % sig.inputs["images"].dtype)
    check([d.size for d in sig.inputs["images"].tensor_shape.dim] == [-1, 784], "images shape")
    check([d.size for d in sig.outputs["scores"].tensor_shape.dim] == [-1, 10], "scores shape")
    check(sig.method_name == "tensorflow/serving/predict", "method_name %r" % sig.method_name)

    status_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "mnist"
    result = status_stub.GetModelStatus(request, 10.0)
    states = {s.version: s.state for s in result.model_version_status}
    check(states.get(1) == get_model_status_pb2.ModelVersionStatus.AVAILABLE, "status %r" % states)

    try:
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "nope"
        stub.Predict(request, 10.0)
        check(False, "unknown model answered")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.NOT_FOUND, "unknown model gave %s" % e.code())

    print("tf-serving client: %d/50 right (float_val), %d/50 (tensor_content); metadata and status OK"
          % (answers[False], answers[True]))


if __name__ == "__main__":
    main()
