"""Merge methods: algebraic properties over generated tensors, and known answers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difftrain.merge import methods

shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)


@st.composite
def tensors(draw, count: int = 2):
    shape = draw(shapes)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


@settings(max_examples=60, deadline=None)
@given(pair=tensors(2))
def test_weighted_sum_endpoints_return_the_inputs(pair):
    a, b = pair
    assert torch.equal(methods.weighted_sum([a, b], [1.0, 0.0]), a)
    assert torch.equal(methods.weighted_sum([a, b], [0.0, 1.0]), b)


@settings(max_examples=60, deadline=None)
@given(pair=tensors(2), t=st.floats(0, 1))
def test_slerp_of_a_tensor_with_itself_is_that_tensor(pair, t):
    a, _ = pair
    torch.testing.assert_close(methods.slerp(a, a.clone(), t), a)


@settings(max_examples=60, deadline=None)
@given(pair=tensors(2))
def test_slerp_endpoints(pair):
    a, b = pair
    torch.testing.assert_close(methods.slerp(a, b, 0.0), a)
    torch.testing.assert_close(methods.slerp(a, b, 1.0), b)


def test_slerp_known_answer_on_orthogonal_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = methods.slerp(a, b, 0.5)
    torch.testing.assert_close(mid, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]))
    assert mid.norm() == pytest.approx(1.0)  # lerp would give 0.707
    # nearly parallel: falls back to linear interpolation
    c = torch.tensor([1.0, 1e-6])
    torch.testing.assert_close(methods.slerp(a, c, 0.5), 0.5 * (a + c))


@settings(max_examples=60, deadline=None)
@given(trio=tensors(3), w=st.floats(-2, 2))
def test_ties_and_dare_reduce_to_task_arithmetic_with_one_model(trio, w):
    base, x, y = trio
    # TIES normalises weights over the agreeing inputs (as mergekit does): one model, weight 1
    expected = methods.task_arithmetic(base, [x], [1.0])
    torch.testing.assert_close(methods.ties(base, [x], [1.0], density=1.0), expected)
    # DARE with drop rate 0 is task arithmetic for any weights and any number of models
    expected = methods.task_arithmetic(base, [x, y], [w, 1.0])
    got = methods.dare(base, [x, y], [w, 1.0], drop_rate=0.0, seed=1, name="k")
    torch.testing.assert_close(got, expected)


@settings(max_examples=60, deadline=None)
@given(trio=tensors(3), w=st.floats(0.05, 0.95))
def test_ties_density_1_is_task_arithmetic_when_signs_agree(trio, w):
    base, x, y = trio
    # two task vectors with the same sign everywhere, weights summing to 1
    tx, ty = x.abs() + 0.1, y.abs() + 0.1
    weights = [w, 1 - w]
    expected = methods.task_arithmetic(base, [base + tx, base + ty], weights)
    got = methods.ties(base, [base + tx, base + ty], weights, density=1.0)
    torch.testing.assert_close(got, expected)


@settings(max_examples=40, deadline=None)
@given(trio=tensors(3), p=st.floats(0.0, 0.95), seed=st.integers(0, 2**32 - 1))
def test_dare_repeats_exactly_with_a_fixed_seed(trio, p, seed):
    base, x, y = trio
    first = methods.dare(base, [x, y], [0.5, 0.5], p, seed, "model.w")
    again = methods.dare(base, [x, y], [0.5, 0.5], p, seed, "model.w")
    assert torch.equal(first, again)


def test_dare_masks_depend_on_seed_and_tensor_name_and_rescale():
    base = torch.zeros(10_000)
    x = torch.ones(10_000)
    a = methods.dare(base, [x], [1.0], 0.5, seed=1, name="a")
    b = methods.dare(base, [x], [1.0], 0.5, seed=2, name="a")
    c = methods.dare(base, [x], [1.0], 0.5, seed=1, name="b")
    assert not torch.equal(a, b)
    assert not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 2.0}  # kept entries rescaled by 1/(1-p)
    assert a.mean().item() == pytest.approx(1.0, abs=0.05)  # expectation preserved


def test_ties_known_answer():
    base = torch.zeros(4)
    m1 = torch.tensor([3.0, -1.0, 0.5, -2.0])
    m2 = torch.tensor([0.9, 2.0, -0.2, -1.0])
    # density 0.5 keeps the 2 largest magnitudes of each task vector
    # t1 -> [3, 0, 0, -2]; t2 -> [0, 2, 0, -1]; signs: [+, +, 0, -]
    got = methods.ties(base, [m1, m2], [1.0, 1.0], density=0.5)
    torch.testing.assert_close(got, torch.tensor([3.0, 2.0, 0.0, -1.5]))


def test_trim_keeps_the_largest_magnitudes():
    tau = torch.tensor([0.1, -5.0, 2.0, -0.3, 4.0])
    torch.testing.assert_close(methods.trim(tau, 0.4), torch.tensor([0.0, -5.0, 0.0, 0.0, 4.0]))
    assert torch.equal(methods.trim(tau, 1.0), tau)


def test_lora_delta_known_answer_linear_and_conv():
    down = torch.tensor([[1.0, 2.0]])  # rank 1, in 2
    up = torch.tensor([[3.0], [4.0]])  # out 2
    torch.testing.assert_close(
        methods.lora_delta(down, up, alpha=0.5, target_shape=(2, 2)),
        0.5 * torch.tensor([[3.0, 6.0], [4.0, 8.0]]),
    )
    conv_down = torch.randn(2, 3, 3, 3)
    conv_up = torch.randn(5, 2, 1, 1)
    delta = methods.lora_delta(conv_down, conv_up, alpha=None, target_shape=(5, 3, 3, 3))
    expected = torch.einsum("or,rikl->oikl", conv_up[:, :, 0, 0], conv_down)
    torch.testing.assert_close(delta, expected)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), rank=st.integers(1, 4))
def test_svd_reextraction_is_exact_at_full_rank(seed, rank):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(6, rank, generator=gen) @ torch.randn(rank, 5, generator=gen)
    down, up = methods.lora_svd(delta, rank)
    torch.testing.assert_close(up @ down, delta, atol=1e-4, rtol=1e-4)
