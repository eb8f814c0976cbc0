"""Pricing in integer cents (design.md, "Money"). No float touches a money value:
megapixels are kept as whole pixels and every division is an integer one."""

from __future__ import annotations

from dataclasses import dataclass

PIXELS_PER_CREDIT = 4_000_000  # Upsampler precise-upscale: 1 credit per 4 output MP
STRIPE_MINIMUM_CENTS = 50  # Stripe refuses USD charges under $0.50
DEFAULT_CREDIT_PRICE_CENTS = 4
DEFAULT_MARKUP_PERCENT = 500
MARKUP_RANGE = (50, 1200)  # the plugin's allowed range


def resolution_factor(resolution: str) -> int:
    """"4x" -> 4. Raises ValueError for anything that is not <digits>x."""
    if not resolution.endswith("x") or not resolution[:-1].isdigit():
        raise ValueError(f"resolution must look like '4x', got {resolution!r}")
    factor = int(resolution[:-1])
    if factor < 1:
        raise ValueError(f"resolution factor must be at least 1, got {resolution!r}")
    return factor


@dataclass(frozen=True)
class Quote:
    output_width: int
    output_height: int
    credits: int
    cost_cents: int
    price_cents: int
    markup_percent: int

    @property
    def output_pixels(self) -> int:
        return self.output_width * self.output_height


def quote(
    width: int,
    height: int,
    resolution: str,
    *,
    credit_price_cents: int = DEFAULT_CREDIT_PRICE_CENTS,
    markup_percent: int = DEFAULT_MARKUP_PERCENT,
) -> Quote:
    """credits = ceil(output_mp / 4); cost = credits * credit price;
    price = cost * (1 + markup/100) rounded half-up to the cent, at least 50 cents."""
    for name, value in (("width", width), ("height", height), ("credit_price_cents", credit_price_cents), ("markup_percent", markup_percent)):
        if type(value) is not int:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    if credit_price_cents < 0 or markup_percent < 0:
        raise ValueError("credit price and markup must not be negative")
    factor = resolution_factor(resolution)
    out_w, out_h = width * factor, height * factor
    credits = max(1, -(-(out_w * out_h) // PIXELS_PER_CREDIT))  # ceil, at least one
    cost = credits * credit_price_cents
    price = (cost * (100 + markup_percent) + 50) // 100  # half-up to the cent
    return Quote(out_w, out_h, credits, cost, max(price, STRIPE_MINIMUM_CENTS), markup_percent)


def format_usd(cents: int) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents) // 100}.{abs(cents) % 100:02d}"
