"""ONNX tensor element types, by the numbers of onnx.TensorProto: one table for every module that
writes or checks graphs without importing onnx first."""
from __future__ import annotations

FLOAT, UINT8, INT8, INT32, INT64, BOOL, FLOAT16, INT4 = 1, 2, 3, 6, 7, 9, 10, 22

# numpy / torch dtype names of graph inputs and outputs -> ONNX type.
ONNX_TYPES = {"float32": FLOAT, "int64": INT64, "int32": INT32, "float16": FLOAT16, "bool": BOOL}
NAMES = {FLOAT: "float32", UINT8: "uint8", INT8: "int8", INT32: "int32", INT64: "int64", BOOL: "bool",
         FLOAT16: "float16", INT4: "int4"}
# float types -> the name of a float tied table's format in the manifest.
FLOAT_FORMATS = {FLOAT: "fp32", FLOAT16: "fp16"}


def float_type(precision: str) -> int:
    """The float type of an engine's activations and float weights."""
    return FLOAT16 if precision == "fp16" else FLOAT
