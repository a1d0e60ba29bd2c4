"""Written-out derivatives (LayerNorm, erf GELU, masked softmax, token cross-entropy) equal torch autograd's, keep
their inputs' dtypes, and keep only what their backward pass needs.

The training step's gradients are compared with transformers' end to end in test_training_step.py; these tests pin
each rule alone, at its edges (masked keys, a fully masked row, label smoothing, ignored labels, bfloat16)."""
import io
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.ad_checkpoint import print_saved_residuals

from bertgen_flax import cpu_kernels, modeling
from bertgen_flax.training import token_loss

TOL = 1e-5


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def _saved_with_shape(f, args, shape) -> list[str]:
    """The dtypes of the arrays of ``shape`` that the backward pass of ``f`` keeps (its arguments excluded)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    want = "[" + ",".join(map(str, shape)) + "]"
    return [line.split("[")[0] for line in out.getvalue().splitlines()
            if line.split(" ")[0].endswith(want) and "from the argument" not in line]


@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm_gradients_equal_torch(with_residual):
    rng = np.random.default_rng(0)
    x, res, g = (rng.normal(size=(2, 5, 16)).astype(np.float32) * s for s in (3.0, 1.0, 1.0))
    scale, bias = rng.normal(size=16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    tx, tres, tscale, tbias = (torch.tensor(a, requires_grad=True) for a in (x, res, scale, bias))
    inp = tx + tres if with_residual else tx
    torch.nn.functional.layer_norm(inp, (16,), tscale, tbias, 1e-12).backward(torch.tensor(g))

    def f(x, res, scale, bias):
        return cpu_kernels.layer_norm(x, res if with_residual else None, scale, bias, 1e-12)

    _, vjp = jax.vjp(f, x, res, scale, bias)
    dx, dres, dscale, dbias = vjp(jnp.asarray(g))
    np.testing.assert_allclose(dx, _np(tx.grad), atol=TOL)
    np.testing.assert_allclose(dscale, _np(tscale.grad), atol=TOL)
    np.testing.assert_allclose(dbias, _np(tbias.grad), atol=TOL)
    if with_residual:
        np.testing.assert_allclose(dres, _np(tres.grad), atol=TOL)


def test_gelu_gradient_equals_torch_exact_gelu():
    x = np.linspace(-12.0, 12.0, 401, dtype=np.float32)
    g = np.cos(x).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    torch.nn.functional.gelu(tx).backward(torch.tensor(g))
    _, vjp = jax.vjp(modeling.ACTIVATIONS["gelu"], jnp.asarray(x))
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], _np(tx.grad), atol=TOL)


def test_masked_softmax_gradient_equals_torch_masked_fill_softmax():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(2, 3, 4, 6)).astype(np.float32) * 4
    g = rng.normal(size=scores.shape).astype(np.float32)
    allowed = rng.random((2, 1, 4, 6)) > 0.3
    allowed[1, 0, 2, :] = False  # a fully masked row: uniform probabilities, no gradient to its scores
    ts = torch.tensor(scores, requires_grad=True)
    probs = ts.masked_fill(~torch.tensor(allowed), torch.finfo(torch.float32).min).softmax(-1)
    probs.backward(torch.tensor(g))
    got, vjp = jax.vjp(lambda s: modeling._masked_softmax(s, jnp.asarray(allowed), jnp.float32), jnp.asarray(scores))
    np.testing.assert_allclose(got, _np(probs), atol=TOL)
    np.testing.assert_allclose(vjp(jnp.asarray(g))[0], _np(ts.grad), atol=TOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_token_loss_gradient_equals_torch_cross_entropy(smoothing):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    labels = rng.integers(0, 11, (3, 5))
    labels[2, 2:] = -100
    tl = torch.tensor(logits, requires_grad=True)
    want = torch.nn.functional.cross_entropy(tl.reshape(-1, 11), torch.tensor(labels).reshape(-1),
                                             ignore_index=-100, label_smoothing=smoothing)
    want.backward()
    loss, grad = jax.value_and_grad(lambda z: token_loss(z, jnp.asarray(labels), smoothing)[0])(jnp.asarray(logits))
    assert abs(float(loss) - float(want.detach())) <= TOL
    np.testing.assert_allclose(grad, _np(tl.grad), atol=TOL)
    assert not np.any(np.asarray(grad)[2, 2:])  # ignored labels: no gradient


def test_derivatives_return_bfloat16_for_bfloat16_inputs():
    x = jnp.linspace(-3, 3, 2 * 4 * 8, dtype=jnp.bfloat16).reshape(2, 4, 8)
    one = jnp.ones(8, jnp.float32)
    cases = {
        "layer_norm": (lambda x: cpu_kernels.layer_norm(x, None, one, 0 * one, 1e-12, jnp.bfloat16), x),
        "gelu": (modeling.ACTIVATIONS["gelu"], x),
        "softmax": (lambda x: modeling._masked_softmax(x, None, jnp.bfloat16), x),
    }
    for name, (f, arg) in cases.items():
        y, vjp = jax.vjp(f, arg)
        (dx,) = vjp(jnp.ones_like(y))
        assert dx.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32)))), name
    labels = jnp.array([[1, 2, -100, 3]])
    grad = jax.grad(lambda z: token_loss(z, labels)[0])(x[:1])
    assert grad.dtype == jnp.bfloat16


def test_layer_norm_backward_keeps_one_input_sized_array():
    x = jnp.ones((4, 6, 32)) + jnp.arange(32.0)
    f = lambda x, r: cpu_kernels.layer_norm(x, r, jnp.ones(32), jnp.zeros(32), 1e-12).sum()
    assert _saved_with_shape(f, (x, x), (4, 6, 32)) == ["f32"]  # the sum x + residual


def test_gelu_backward_keeps_only_its_input():
    x = jnp.linspace(-2, 2, 4 * 64).reshape(4, 64)
    w = jnp.ones((64, 64)) / 64
    f = lambda x: modeling.ACTIVATIONS["gelu"](x @ w).sum()
    assert _saved_with_shape(f, (x,), (4, 64)) == ["f32"]  # x @ w, the GELU's input


def test_masked_softmax_backward_keeps_only_the_probabilities():
    scores = jnp.linspace(-2, 2, 2 * 3 * 5 * 7).reshape(2, 3, 5, 7)
    allowed = jnp.arange(7)[None, None, None, :] < 5
    f = lambda s: (modeling._masked_softmax(s * 1.5, allowed, jnp.float32) ** 2).sum()
    assert _saved_with_shape(f, (scores,), (2, 3, 5, 7)) == ["f32"] * 2  # the probabilities, the square's input


def test_token_loss_backward_keeps_only_the_logits_in_their_own_dtype():
    # bfloat16 logits (a bfloat16 model's LM head) are kept as they are: autodiff of the float32 log_softmax kept
    # a float32 [B, T, V] array, twice the memory, the largest activation of a large-vocabulary step.
    logits = jnp.linspace(-2, 2, 2 * 3 * 50, dtype=jnp.bfloat16).reshape(2, 3, 50)
    labels = jnp.array([[1, 2, -100], [4, 5, 6]])
    f = lambda z: token_loss(z * 1.5, labels, 0.1)[0]
    assert _saved_with_shape(f, (logits,), (2, 3, 50)) == ["bf16"]
