"""Money: dollars per billion trained tokens, and the time and cost of a token budget, from catalog prices.

Prices are the catalog's on-demand hourly prices (planner/catalog/gpus/*.json, sources inside). Two GPUs have
none: the A800 80GB is sold mainly in China and rented by few public clouds, and the A100 40GB has no current
on-demand listing in our reference. For the A800 we take the A100 80GB's price as a stand-in: it is the same
silicon, memory and host link with NVLink capped at 400 GB/s, which a single-GPU plan never uses; the table marks
the figure as a stand-in. The A100 40GB gets no price: its dollar columns are empty, and its BCD-versus-full
ratio (which needs no price: same GPU, same price) is still shown.

A cluster of N GPUs costs N GPU-hours per hour: dollars = price per GPU-hour x N x hours, and its tokens per
second count every rank's tokens. Network, storage and host prices are not counted (the catalog's per-GPU
cloud prices include a share of the host they run in).

"Tokens" are tokens processed by training steps: a step of micro_batch x seq_len x grad_accum tokens. In BCD
each token trains one block, in full-parameter training every layer; the two are compared per token processed,
as the BCD paper compares them at equal data.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.hardware import load_gpu

STAND_INS = {"a800-80g": "a100-80g"}


@dataclass(frozen=True, kw_only=True)
class Price:
    gpu: str
    per_hour: float | None       # dollars per GPU-hour, on demand; None when unknown
    note: str = ""               # "" or why the figure is a stand-in or missing

    @property
    def known(self) -> bool:
        return self.per_hour is not None


def hourly_price(gpu: str) -> Price:
    """The catalog's on-demand price, a documented stand-in, or None with the reason."""
    g = load_gpu(gpu)
    if g.price_per_hour is not None:
        return Price(gpu=gpu, per_hour=float(g.price_per_hour))
    if gpu in STAND_INS:
        other = load_gpu(STAND_INS[gpu])
        return Price(gpu=gpu, per_hour=other.price_per_hour,
                     note=f"stand-in: {other.name}'s price (no public price for the {g.name})")
    return Price(gpu=gpu, per_hour=None, note=f"no price for the {g.name} in the catalog")


def usd_per_billion_tokens(tokens_per_s: float, per_hour: float | None, gpus: int = 1) -> float | None:
    """Dollars per 10^9 tokens on `gpus` GPUs at `per_hour` dollars per GPU-hour, processing `tokens_per_s` in all."""
    if per_hour is None or tokens_per_s <= 0:
        return None
    return per_hour * gpus / 3600.0 / tokens_per_s * 1e9


def token_budget(tokens: float, tokens_per_s: float, per_hour: float | None,
                 gpus: int = 1) -> tuple[float, float | None]:
    """(seconds, dollars) to train on `tokens` tokens at `tokens_per_s` on `gpus` GPUs; dollars None without
    a price."""
    if tokens_per_s <= 0:
        return float("inf"), None
    seconds = tokens / tokens_per_s
    return seconds, (None if per_hour is None else per_hour * gpus * seconds / 3600.0)


def human_seconds(s: float) -> str:
    if s != s or s == float("inf"):
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.1f} {unit}"
    return f"{s:.1f} s"
