"""A small float64 NumPy evaluator of ONNX graphs (the ops a BERT export uses).

onnxruntime is not a dependency; this runs the paraphrase-MiniLM-L3-v2 graph as the
reference its transformers port is checked against. Only the ops that graph uses are
implemented; any other raises ``NotImplementedError``.
"""

import math

import numpy as np

__all__ = ["run_onnx"]

_ERF = np.vectorize(math.erf, otypes=[np.float64])


def _attr(node):
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _layer_norm(x, w, b, axis=-1, epsilon=1e-5, **_):
    mean = x.mean(axis=axis, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axis, keepdims=True)
    return (x - mean) / np.sqrt(var + epsilon) * w + b


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reshape(x, shape):
    shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape.tolist())]
    return x.reshape(shape)


def _slice(x, starts, ends, axes=None, steps=None):
    axes = range(len(starts)) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[int(a)] = slice(int(s), int(min(e, x.shape[int(a)])), int(st))
    return x[tuple(index)]


def _op(node, inputs, attr):
    from onnx import helper, numpy_helper

    t = node.op_type
    if t == "Constant":
        return numpy_helper.to_array(attr["value"])
    if t == "Identity":
        return inputs[0]
    if t in ("Add", "Sub", "Mul", "Div", "Equal", "MatMul"):
        a, b = inputs
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
                "Equal": np.equal, "MatMul": np.matmul}[t](a, b)
    if t == "Shape":
        return np.array(inputs[0].shape, dtype=np.int64)
    if t == "Gather":
        return np.take(inputs[0], inputs[1], axis=attr.get("axis", 0))
    if t == "Unsqueeze":
        out = inputs[0]
        for a in sorted(int(a) % (out.ndim + len(inputs[1])) for a in inputs[1]):
            out = np.expand_dims(out, a)
        return out
    if t == "Concat":
        return np.concatenate([np.atleast_1d(i) for i in inputs], axis=attr["axis"])
    if t == "Reshape":
        return _reshape(inputs[0], inputs[1])
    if t == "Transpose":
        return np.transpose(inputs[0], attr.get("perm"))
    if t == "LayerNormalization":
        return _layer_norm(*inputs, **attr)
    if t == "Softmax":
        return _softmax(inputs[0], attr.get("axis", -1))
    if t == "Erf":
        return _ERF(inputs[0])
    if t == "Slice":
        return _slice(*inputs)
    if t == "ConstantOfShape":
        value = numpy_helper.to_array(attr["value"]) if "value" in attr else np.zeros(1)
        return np.full(inputs[0].astype(int), value[0], dtype=value.dtype)
    if t == "Where":
        return np.where(*inputs)
    if t == "Expand":
        return inputs[0] * np.ones(inputs[1].astype(int), dtype=inputs[0].dtype)
    if t == "Cast":
        return inputs[0].astype(helper.tensor_dtype_to_np_dtype(attr["to"]))
    if t == "ReduceSum":
        axes = None if len(inputs) < 2 or inputs[1] is None else tuple(inputs[1].tolist())
        return inputs[0].sum(axis=axes, keepdims=bool(attr.get("keepdims", 1)))
    if t == "Clip":
        lo = inputs[1] if len(inputs) > 1 else None
        hi = inputs[2] if len(inputs) > 2 else None
        return np.clip(inputs[0], lo, hi)
    raise NotImplementedError(f"ONNX op {t}")


def run_onnx(model, feeds, outputs):
    """Evaluate ``model`` (an ``onnx.ModelProto``) on ``feeds`` (name -> array).

    Floating tensors are promoted to float64 so the result is a reference, not a float32
    replay. Returns ``[value of each name in outputs]``.
    """
    from onnx import numpy_helper

    def promote(a):
        return a.astype(np.float64) if a.dtype.kind == "f" else a

    env = {t.name: promote(numpy_helper.to_array(t)) for t in model.graph.initializer}
    env.update({n: np.asarray(a) for n, a in feeds.items()})
    env[""] = None
    for node in model.graph.node:
        inputs = [env[i] for i in node.input]
        result = _op(node, inputs, _attr(node))
        if isinstance(result, np.ndarray) and result.dtype == np.float32:
            result = result.astype(np.float64)
        env[node.output[0]] = result
    return [env[n] for n in outputs]
