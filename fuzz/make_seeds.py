"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/.

The seeds are real inputs, made the way users make them: Predict requests and tensors
built with TensorFlow Serving's Python client from a real MNIST image, signature.json as
the MNIST exporter and scripts/make_resnet18.py write it, registry values as discovery and
the workers write them, and config files as TF Serving documents them.

Run: .aspire-tfs-client/bin/python fuzz/make_seeds.py  (`make setup` makes that venv;
the MNIST sample is data/mnist_5k.csv.gz). The output is committed; rerun it only to
change the seeds.
"""

import gzip
import json
import os
import struct
import sys

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2

ROOT = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(ROOT, "corpus")
# Index of each dtype in aspire_core::DType::ALL: the tensor_codec target's selector byte.
F32, F64, F16, BF16, I8, I16, I32, I64, U8, BOOL = range(10)


def write(target, name, data):
    folder = os.path.join(CORPUS, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def mnist_pixels(rows):
    """The first `rows` images of the MNIST sample, scaled to [0, 1] as TF Serving's
    MNIST client sends them."""
    path = os.path.join(ROOT, "..", "data", "mnist_5k.csv.gz")
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            values = line.strip().split(",")
            out.append([float(v) / 255.0 for v in values[:784]])
            if len(out) == rows:
                return out
    sys.exit(f"{path} has fewer than {rows} images")


def shape(*dims):
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in dims]
    )


def tensor(dtype, dims, **fields):
    return tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape(*dims), **fields)


def request(name, tensors, version=None, label=None, signature="predict_images", filters=()):
    req = predict_pb2.PredictRequest()
    req.model_spec.name = name
    req.model_spec.signature_name = signature
    if version is not None:
        req.model_spec.version.value = version
    if label is not None:
        req.model_spec.version_label = label
    for key, t in tensors.items():
        req.inputs[key].CopyFrom(t)
    req.output_filter.extend(filters)
    return req.SerializeToString()


def main():
    one, two = mnist_pixels(2)
    as_floats = tensor(types_pb2.DT_FLOAT, [1, 784], float_val=one)
    as_content = tensor(
        types_pb2.DT_FLOAT, [2, 784], tensor_content=struct.pack("<1568f", *(one + two))
    )

    # Router: whole PredictRequests.
    write("wire_split", "mnist_float_val", request("mnist", {"images": as_floats}))
    write(
        "wire_split",
        "mnist_tensor_content_v1",
        request("mnist", {"images": as_content}, version=1, filters=["scores"]),
    )
    write("wire_split", "label_stable", request("mnist", {"images": as_floats}, label="stable"))
    # A client that concatenated two messages: model_spec twice, merged by protobuf.
    write(
        "wire_split",
        "two_model_specs",
        request("mnist", {"images": as_floats}) + request("mnist", {}, version=2),
    )

    # Worker: one selector byte (the signature's dtype), then the request's TensorProto.
    codec = {
        "mnist_float_val": (F32, as_floats),
        "mnist_tensor_content": (F32, as_content),
        "fill_one_value": (F32, tensor(types_pb2.DT_FLOAT, [3, 4], float_val=[0.5])),
        "f64": (F64, tensor(types_pb2.DT_DOUBLE, [1, 3], double_val=[1.5, -2.0, 1e300])),
        "f16_half_val": (F16, tensor(types_pb2.DT_HALF, [1, 2], half_val=[0x3C00, 0xC000])),
        "bf16_half_val": (BF16, tensor(types_pb2.DT_BFLOAT16, [1, 2], half_val=[0x3F80, 1])),
        "i8": (I8, tensor(types_pb2.DT_INT8, [1, 3], int_val=[-128, 0, 127])),
        "i16": (I16, tensor(types_pb2.DT_INT16, [1, 2], int_val=[-32768, 300])),
        "i32": (I32, tensor(types_pb2.DT_INT32, [2, 1], int_val=[7, -7])),
        "i64": (I64, tensor(types_pb2.DT_INT64, [1, 2], int64_val=[1 << 40, -1])),
        "u8_pixels": (U8, tensor(types_pb2.DT_UINT8, [1, 4], int_val=[0, 17, 200, 255])),
        "bool": (BOOL, tensor(types_pb2.DT_BOOL, [1, 3], bool_val=[True, False, True])),
        "empty_batch": (F32, tensor(types_pb2.DT_FLOAT, [0, 784])),
    }
    for name, (selector, t) in codec.items():
        write("tensor_codec", name, bytes([selector]) + t.SerializeToString())

    # signature.json as the MNIST exporter and make_resnet18.py write it.
    def spec(name, dims):
        return {"name": name, "dtype": "float32", "shape": dims}

    mnist_sig = {
        "signatures": {
            "predict_images": {
                "method": "forward",
                "inputs": [spec("images", [-1, 784])],
                "outputs": [spec("scores", [-1, 10])],
            }
        }
    }
    write("signature_json", "mnist", json.dumps(mnist_sig, indent=2) + "\n")
    resnet = {
        "signatures": {
            "serving_default": {
                "method": "forward",
                "inputs": [spec("input", [-1, 3, 224, 224])],
                "outputs": [spec("logits", [-1, 1000])],
            }
        }
    }
    write("signature_json", "resnet18", json.dumps(resnet, indent=2) + "\n")
    several = {
        "signatures": {
            "serving_default": {
                "inputs": [{"name": "x", "dtype": "DT_INT64"}, {"name": "mask", "dtype": "bool", "shape": [-1, -1]}],
                "outputs": [{"name": "y", "dtype": "float16", "shape": [-1, 2]}],
            },
            "embed": {
                "method": "embed",
                "inputs": [{"name": "tokens", "dtype": "int32", "shape": [-1, 128]}],
                "outputs": [{"name": "vectors", "dtype": "bfloat16", "shape": [-1, 128, 64]}],
            },
        }
    }
    write("signature_json", "two_signatures", json.dumps(several))

    # Registry values: NUL-separated records, each a selector byte and a value
    # (see fuzz/src/etcd_values.rs). 0-2: mnist available/aspired/pinned, 3-5: the same
    # of model "half", 6-7: workers, 8: raw key; high bit: delete.
    available = {
        "versions": [
            {"version": v, "path": f"file:///models/mnist/{v}", "signatures": mnist_sig}
            for v in (1, 2)
        ]
    }
    worker = {
        "address": "127.0.0.1:8601",
        "device": "cpu",
        "models": {
            "mnist": {
                "1": {"state": "AVAILABLE"},
                "2": {"state": "END", "error": "load failed: model.pt is not TorchScript"},
            }
        },
    }
    records = [
        b"\x00" + json.dumps(available).encode(),
        b"\x01" + json.dumps({"versions": [2]}).encode(),
        b"\x02" + b"1, 2",
        b"\x06" + json.dumps(worker).encode(),
        b"\x08/aspire/models/mnist/pined\x011",
        b"\x82",
        b"\x86",
    ]
    write("etcd_values", "discovery_and_workers", b"\x00".join(records))
    write("etcd_values", "bad_pin_then_delete", b"\x00".join([records[0], b"\x023", b"\x82"]))

    # Text-format configs as TF Serving documents them (deploy/base/models.config).
    write(
        "text_config",
        "models_config",
        open(os.path.join(ROOT, "..", "deploy", "base", "models.config")).read(),
    )
    write(
        "text_config",
        "models_every_policy",
        """model_config_list {
  config {
    name: "resnet"
    base_path: "s3://bucket/resnet/"
    model_platform: "tensorflow"
    model_version_policy { latest { num_versions: 2 } }
    version_labels { key: "stable" value: 3 }
  }
  config { name: "all" base_path: "rel/all" model_version_policy { all {} } }
  config {
    name: "pinned"
    base_path: "file:///models/pinned"
    model_version_policy { specific { versions: 4 versions: 2 } }
  }
}
""",
    )
    write(
        "text_config",
        "batching_parameters",
        """max_batch_size { value: 32 }
batch_timeout_micros { value: 500 }
max_enqueued_batches { value: 100 }
num_batch_threads { value: 2 }
allowed_batch_sizes: 8
allowed_batch_sizes: 16
allowed_batch_sizes: 32
pad_variable_length_inputs: false
""",
    )


if __name__ == "__main__":
    main()
