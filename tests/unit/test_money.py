"""Money (design.md, "Money"): integer cents, never floats; credits = ceil(output MP / 4);
cost = credits * credit price; price = cost * (1 + markup/100) rounded half-up to the
cent, at least $0.50."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.money import (
    DEFAULT_CREDIT_PRICE_CENTS,
    DEFAULT_MARKUP_PERCENT,
    PIXELS_PER_CREDIT,
    STRIPE_MINIMUM_CENTS,
    format_usd,
    quote,
    resolution_factor,
)


def test_contract_constants():
    assert PIXELS_PER_CREDIT == 4_000_000
    assert STRIPE_MINIMUM_CENTS == 50
    assert DEFAULT_CREDIT_PRICE_CENTS == 4
    assert DEFAULT_MARKUP_PERCENT == 500


def test_worked_example_from_design():
    q = quote(2000, 2000, "4x")
    assert (q.output_width, q.output_height) == (8000, 8000)
    assert q.output_pixels == 64_000_000
    assert q.credits == 16
    assert q.cost_cents == 64
    assert q.price_cents == 384
    assert q.markup_percent == 500
    assert format_usd(q.cost_cents) == "$0.64"
    assert format_usd(q.price_cents) == "$3.84"


def test_stripe_minimum_floor():
    q = quote(100, 100, "2x")  # 40 000 output pixels -> 1 credit -> 4c cost -> 24c price
    assert q.credits == 1
    assert q.cost_cents == 4
    assert q.price_cents == 50


def test_price_just_above_the_floor_is_not_raised():
    # 9 credits * 1c * 6 = 54c: above the floor, kept as is.
    q = quote(3000, 3000, "2x", credit_price_cents=1)  # 36e6 px -> 9 credits
    assert q.credits == 9
    assert q.price_cents == 54


def test_free_credits_still_charge_the_minimum():
    q = quote(2000, 2000, "4x", credit_price_cents=0)
    assert q.cost_cents == 0
    assert q.price_cents == 50


@pytest.mark.parametrize(
    "width,height,resolution,credits",
    [
        (1000, 1000, "2x", 1),  # exactly 4 000 000 output pixels: one credit
        (1000, 1001, "2x", 2),  # 4 008 000 pixels: one pixel row over -> two credits
        (1, 1, "2x", 1),  # tiny images still cost one credit
        (2000, 2000, "1x", 1),  # exactly 4 MP
        (2000, 2001, "1x", 2),
        (4000, 4000, "2x", 16),
    ],
)
def test_credit_boundaries(width, height, resolution, credits):
    assert quote(width, height, resolution).credits == credits


def test_half_cent_rounds_up():
    # 25c cost at 302% markup: exactly 25 * 4.02 = 100.5 cents. Half-up gives 101
    # (banker's rounding would give 100; float arithmetic gives 100.49999999999999).
    q = quote(1000, 1000, "2x", credit_price_cents=25, markup_percent=302)
    assert q.cost_cents == 25
    assert q.price_cents == 101


def test_half_cent_rounds_up_on_odd_base():
    # 45c at 230%: 45 * 3.3 = 148.5 -> 149
    q = quote(1000, 1000, "2x", credit_price_cents=45, markup_percent=230)
    assert q.price_cents == 149


def test_forty_nine_hundredths_round_down():
    # 49c at 101%: 49 * 2.01 = 98.49 -> 98
    q = quote(1000, 1000, "2x", credit_price_cents=49, markup_percent=101)
    assert q.cost_cents == 49
    assert q.price_cents == 98


def test_fifty_one_hundredths_round_up():
    # 51c at 101%: 51 * 2.01 = 102.51 -> 103
    q = quote(1000, 1000, "2x", credit_price_cents=51, markup_percent=101)
    assert q.price_cents == 103


def test_very_large_image_is_exact():
    q = quote(65535, 65535, "8x")
    assert (q.output_width, q.output_height) == (524_280, 524_280)
    assert q.output_pixels == 274_869_518_400
    # 274 869 518 400 / 4 000 000 = 68 717.3796 -> 68 718 credits
    assert q.credits == 68_718
    assert q.cost_cents == 274_872
    assert q.price_cents == 1_649_232
    for value in (q.credits, q.cost_cents, q.price_cents, q.output_pixels):
        assert type(value) is int


@pytest.mark.parametrize(
    "kwargs",
    [
        {"width": 2000.0},
        {"height": 2000.0},
        {"markup_percent": 500.0},
        {"credit_price_cents": 4.0},
        {"credit_price_cents": Decimal("4")},
        {"width": "2000"},
        {"markup_percent": True},  # bool is an int subclass, but not a number of percent
    ],
)
def test_floats_and_other_non_ints_are_refused(kwargs):
    args = {"width": 2000, "height": 2000, "resolution": "4x"} | kwargs
    width, height, resolution = args.pop("width"), args.pop("height"), args.pop("resolution")
    with pytest.raises(TypeError):
        quote(width, height, resolution, **args)


@pytest.mark.parametrize("width,height", [(0, 100), (100, 0), (-1, 100)])
def test_non_positive_dimensions_are_refused(width, height):
    with pytest.raises(ValueError):
        quote(width, height, "4x")


@pytest.mark.parametrize("kwargs", [{"credit_price_cents": -1}, {"markup_percent": -1}])
def test_negative_prices_are_refused(kwargs):
    with pytest.raises(ValueError):
        quote(100, 100, "4x", **kwargs)


@pytest.mark.parametrize("resolution,factor", [("1x", 1), ("2x", 2), ("4x", 4), ("8x", 8), ("16x", 16)])
def test_resolution_factor(resolution, factor):
    assert resolution_factor(resolution) == factor


@pytest.mark.parametrize("bad", ["4", "x", "0x", "-2x", "4X", "four x", "2.5x", "", " 4x"])
def test_resolution_factor_rejects_garbage(bad):
    with pytest.raises(ValueError):
        resolution_factor(bad)


@pytest.mark.parametrize(
    "cents,text",
    [(0, "$0.00"), (5, "$0.05"), (50, "$0.50"), (384, "$3.84"), (100, "$1.00"), (1_649_232, "$16492.32"),
     (-150, "-$1.50"), (-5, "-$0.05")],
)
def test_format_usd(cents, text):
    assert format_usd(cents) == text


dimensions = st.integers(min_value=1, max_value=65_535)
factors = st.sampled_from(["1x", "2x", "4x", "8x", "16x"])
markups = st.integers(min_value=0, max_value=1200)
credit_prices = st.integers(min_value=0, max_value=1000)


@given(dimensions, dimensions, factors, credit_prices, markups)
def test_quote_properties(width, height, resolution, credit_price, markup):
    q = quote(width, height, resolution, credit_price_cents=credit_price, markup_percent=markup)
    f = int(resolution[:-1])
    pixels = width * f * height * f
    assert q.output_pixels == pixels
    assert q.credits >= 1
    assert q.credits * PIXELS_PER_CREDIT >= pixels > (q.credits - 1) * PIXELS_PER_CREDIT
    assert q.cost_cents == q.credits * credit_price
    assert q.price_cents >= STRIPE_MINIMUM_CENTS
    # Exact rational price, rounded half-up, then the floor.
    exact = Fraction(q.cost_cents * (100 + markup), 100)
    half_up = math.floor(exact + Fraction(1, 2))
    assert q.price_cents == max(half_up, STRIPE_MINIMUM_CENTS)
    if q.price_cents > STRIPE_MINIMUM_CENTS:
        assert -Fraction(1, 2) < Fraction(q.price_cents) - exact <= Fraction(1, 2)
    for value in (q.output_width, q.output_height, q.credits, q.cost_cents, q.price_cents, q.markup_percent):
        assert type(value) is int


@given(dimensions, dimensions, factors, st.floats(allow_nan=False, allow_infinity=False))
def test_any_float_argument_is_a_type_error(width, height, resolution, value):
    for kwargs in ({"markup_percent": value}, {"credit_price_cents": value}):
        with pytest.raises(TypeError):
            quote(width, height, resolution, **kwargs)
    with pytest.raises(TypeError):
        quote(value, height, resolution)
    with pytest.raises(TypeError):
        quote(width, value, resolution)


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_format_usd_round_trips(cents):
    text = format_usd(cents)
    sign = -1 if text.startswith("-") else 1
    dollars, hundredths = text.lstrip("-").removeprefix("$").split(".")
    assert len(hundredths) == 2
    assert sign * (int(dollars) * 100 + int(hundredths)) == cents


@given(st.integers(min_value=0, max_value=10**9), st.sampled_from([50, 150, 250, 1150]))
def test_exact_half_cents_always_round_up(k, markup):
    # With an odd credit price and a markup of 50 + 100n percent the exact price ends
    # in exactly half a cent: (2k+1) * (150 + 100n) / 100 = ... .5
    credit_price = 2 * k + 1
    q = quote(1000, 1000, "2x", credit_price_cents=credit_price, markup_percent=markup)  # one credit
    numerator = credit_price * (100 + markup)
    assert numerator % 100 == 50
    if numerator // 100 + 1 >= STRIPE_MINIMUM_CENTS:
        assert q.price_cents == numerator // 100 + 1
