"""Array type in = array type out for torch, JAX and TensorFlow, through DLPack."""

import numpy as np
import pytest
from helpers import dense_attention, rel_error, require

import mcattn
from mcattn._array import import_arrays
from mcattn.errors import GradientNotSupportedError


@pytest.fixture
def qkv():
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((2, 3, 10, 8), dtype=np.float32) for _ in range(3))


def test_torch_in_torch_out(qkv):
    torch = require("torch")
    tq, tk, tv = (torch.from_numpy(a) for a in qkv)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 7:] = False
    out = mcattn.attention(tq, tk, tv, key_padding_mask=kpm, is_causal=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    ref = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.tril(torch.ones(10, 10, dtype=torch.bool)) & kpm[:, None, None, :]
    )
    assert rel_error(out.numpy(), ref.numpy()) < 2e-6


def test_torch_import_is_zero_copy(qkv):
    torch = require("torch")
    t = torch.from_numpy(qkv[0])
    _, native = import_arrays({"q": t})
    assert np.shares_memory(native["q"], qkv[0])
    t_strided = t.transpose(-1, -2)  # a non-contiguous view crosses without a copy too
    _, native = import_arrays({"q": t_strided})
    assert np.shares_memory(native["q"], qkv[0])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_torch_dtypes_round_trip(qkv, dtype):
    torch = require("torch")
    tdt = getattr(torch, dtype)
    tq, tk, tv = (torch.from_numpy(a).to(tdt) for a in qkv)
    out = mcattn.attention(tq, tk, tv)
    assert out.dtype == tdt
    ref = dense_attention(*(t.to(torch.float64).numpy() for t in (tq, tk, tv)))
    assert rel_error(out.to(torch.float64).numpy(), ref) < {"float16": 2e-3, "bfloat16": 1e-2,
                                                            "float64": 1e-12}[dtype]


def test_torch_requires_grad_is_refused_naming_the_remedies(qkv):
    torch = require("torch")
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in qkv)
    with pytest.raises(GradientNotSupportedError, match="q is a torch tensor that requires grad") as err:
        mcattn.attention(tq, tk, tv)
    for remedy in ("mcattn.frameworks.torch.attention", "torch.no_grad()", "torch.inference_mode()"):
        assert remedy in str(err.value)  # each works (no_grad: the test below)
    with pytest.raises(GradientNotSupportedError, match="v is a torch tensor that requires grad"):
        mcattn.attention(tq.detach(), tk.detach(), tv)
    from mcattn.frameworks.torch import attention  # the training remedy

    assert attention(tq, tk, tv, is_causal=True).grad_fn is not None


def test_torch_requires_grad_runs_forward_only_under_no_grad(qkv):
    torch = require("torch")
    tq, tk, tv = (torch.from_numpy(a.copy()).requires_grad_(True) for a in qkv)
    ref = dense_attention(*qkv, is_causal=True)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            out = mcattn.attention(tq, tk, tv, is_causal=True)
        assert isinstance(out, torch.Tensor) and not out.requires_grad and out.grad_fn is None
        assert rel_error(out.numpy(), ref) < 2e-6, mode.__name__


def test_mixed_libraries_are_refused(qkv):
    torch = require("torch")
    with pytest.raises(TypeError, match="one library"):
        mcattn.attention(torch.from_numpy(qkv[0]), *qkv[1:])


def test_jax_in_jax_out(qkv):
    jax = require("jax")
    jnp = jax.numpy
    jq, jk, jv = (jnp.asarray(a) for a in qkv)
    out = mcattn.attention(jq, jk, jv, is_causal=True)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    assert rel_error(np.asarray(out), dense_attention(*qkv, is_causal=True)) < 2e-6
    in16 = [a.astype(jnp.bfloat16) for a in (jq, jk, jv)]
    out16 = mcattn.attention(*in16)
    assert out16.dtype == jnp.bfloat16
    # Computed in float32 from the rounded inputs: within bfloat16 rounding of the output.
    ref = dense_attention(*(np.asarray(a.astype(jnp.float32), dtype=np.float64) for a in in16))
    assert rel_error(np.asarray(out16.astype(jnp.float32)), ref) < 8e-3


def test_tensorflow_in_tensorflow_out(qkv):
    tf = require("tensorflow")
    tq, tk, tv = (tf.constant(a) for a in qkv)
    out = mcattn.attention(tq, tk, tv)
    assert isinstance(out, tf.Tensor) and out.dtype == tf.float32
    assert rel_error(out.numpy(), dense_attention(*qkv)) < 2e-6
    in16 = [tf.cast(t, tf.bfloat16) for t in (tq, tk, tv)]
    out16 = mcattn.attention(*in16)
    assert out16.dtype == tf.bfloat16
    ref = dense_attention(*(tf.cast(t, tf.float64).numpy() for t in in16))
    assert rel_error(tf.cast(out16, tf.float64).numpy(), ref) < 8e-3


def test_python_lists_give_numpy(qkv):
    out = mcattn.attention(*(a.tolist() for a in qkv))
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
