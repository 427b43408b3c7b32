"""contrastive/flop_count.py against FLOPs worked out by hand: 2 x multiply-adds of each matmul
and convolution, scans counted per iteration, shard_map bodies per device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec

from contrastive.flop_count import matmul_flops

f32 = jnp.float32


def spec(*shape):
    return jax.ShapeDtypeStruct(shape, f32)


def test_matmuls_and_batched_einsums():
    assert matmul_flops(lambda a, b: a @ b, spec(3, 5), spec(5, 7)) == 2 * 3 * 5 * 7
    einsum = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)  # noqa: E731
    assert matmul_flops(einsum, spec(4, 3, 5), spec(4, 5, 7)) == 2 * 4 * 3 * 5 * 7
    # Elementwise work is not counted.
    assert matmul_flops(lambda a: jnp.exp(a) * 2 + a, spec(100, 100)) == 0


@pytest.mark.parametrize("groups", [1, 2])
def test_convolutions_count_each_output_over_its_kernel_slice(groups):
    def conv(x, k):
        return jax.lax.conv_general_dilated(
            x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )  # fmt: skip

    # Output [2, 8, 8, 6]; each output sums 3 x 3 x (4 / groups) products.
    flops = matmul_flops(conv, spec(2, 8, 8, 4), spec(3, 3, 4 // groups, 6))
    assert flops == 2 * (2 * 8 * 8 * 6) * (3 * 3 * 4 // groups)


def test_a_gradient_counts_the_forward_and_backward_matmuls():
    batch, d_in, hidden, d_out = 8, 5, 6, 3

    def loss(params, x):
        return jnp.sum(jnp.tanh(x @ params["w1"]) @ params["w2"])

    params = {"w1": spec(d_in, hidden), "w2": spec(hidden, d_out)}
    # Forward: x @ w1, h @ w2. Backward: dw2 = h^T dy, dh = dy w2^T, dw1 = x^T dh (no dx: x is
    # not differentiated).
    expected = 2 * batch * (d_in * hidden + 3 * hidden * d_out + d_in * hidden)
    assert matmul_flops(jax.grad(loss), params, spec(batch, d_in)) == expected
    # Rematerialisation recomputes inside the backward pass what it needs of the forward:
    # h = tanh(x @ w1) (the output matmul's result is not needed).
    remat = jax.grad(jax.checkpoint(loss))
    recomputed = 2 * batch * d_in * hidden
    assert matmul_flops(remat, params, spec(batch, d_in)) == expected + recomputed


def test_control_flow():
    product = 2 * 4 * 4 * 4
    scan = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=5)[0]  # noqa: E731
    assert matmul_flops(scan, spec(4, 4)) == 5 * product  # XLA counts a loop body once
    # A while loop's trip count is a run-time value: its body counts once.
    loop = lambda x: jax.lax.while_loop(lambda c: c[0, 0] < 9, lambda c: c @ c, x)  # noqa: E731
    assert matmul_flops(loop, spec(4, 4)) == product
    branches = lambda p, x: jax.lax.cond(p, lambda y: y @ y @ y, lambda y: y @ y, x)  # noqa: E731
    assert matmul_flops(branches, jax.ShapeDtypeStruct((), bool), spec(4, 4)) == 2 * product
    assert matmul_flops(jax.jit(jax.jit(scan)), spec(4, 4)) == 5 * product


def test_shard_map_bodies_count_once_per_device():
    devices = jax.device_count()
    mesh = jax.make_mesh((devices,), ("data",))
    rows = PartitionSpec("data")
    local = jax.shard_map(
        lambda a, b: a @ b, mesh=mesh, in_specs=(rows, PartitionSpec()), out_specs=rows
    )
    a = jax.device_put(jnp.ones((2 * devices, 5)), jax.NamedSharding(mesh, rows))
    b = jnp.ones((5, 3))
    # Each device multiplies its 2 rows; together they do the whole [2n, 5] @ [5, 3].
    assert matmul_flops(local, a, b) == 2 * (2 * devices) * 5 * 3
