"""Our dropout: nn.Dropout's contract with 16-bit draws (the kept fraction, the mean, independence, dtypes)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bertgen_flax.modeling import Dropout


def _apply(rate, x, seed=0, deterministic=False):
    return Dropout(rate).apply({}, x, deterministic=deterministic, rngs={"dropout": jax.random.PRNGKey(seed)})


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_drops_the_configured_fraction_and_keeps_the_mean(rate):
    x = jnp.ones((400, 1000), jnp.float32)  # 4e5 draws: the dropped fraction's standard deviation is < 8e-4
    y = np.asarray(_apply(rate, x))
    assert abs((y == 0).mean() - rate) < 4e-3
    assert abs(y.mean() - 1.0) < 1e-2
    kept = y[y != 0]
    np.testing.assert_allclose(kept, 65536 / round((1 - rate) * 65536), rtol=1e-7)  # the exact inverse scale


def test_dropout_is_the_identity_when_deterministic_or_at_rate_zero_and_zero_at_rate_one():
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 7))
    assert np.array_equal(_apply(0.3, x, deterministic=True), x)
    assert np.array_equal(_apply(0.0, x), x)
    assert not np.asarray(_apply(1.0, x)).any()


def test_dropout_masks_depend_on_the_key_and_neighbouring_draws_are_independent():
    x = jnp.ones((200, 1000), jnp.float32)
    a, b = (np.asarray(_apply(0.5, x, seed)) == 0 for seed in (0, 1))
    assert 0.48 < (a != b).mean() < 0.52  # two keys: independent masks, 2 p (1 - p)
    # the two halves of one 32-bit word land on neighbours: their drops are uncorrelated
    even, odd = a[:, 0::2].ravel().astype(float), a[:, 1::2].ravel().astype(float)
    assert abs(np.corrcoef(even, odd)[0, 1]) < 0.02


def test_dropout_takes_an_odd_last_axis_and_keeps_the_dtype():
    x = jnp.ones((3, 5, 7), jnp.bfloat16)
    y = _apply(0.2, x)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    y32 = _apply(0.2, x.astype(jnp.float32))
    assert np.array_equal(np.asarray(y) == 0, np.asarray(y32) == 0)  # the mask does not depend on the dtype
