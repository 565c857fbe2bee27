"""planner/units.py: one size convention for every flag. Expected values are written out as arithmetic on
powers of two and ten, not taken from the parser's own tables."""
from __future__ import annotations

import pytest

from planner.errors import UserError
from planner.units import fmt_bytes, size_gib


@pytest.mark.parametrize("text, gib", [
    ("24", 24.0), (24, 24.0), (1.5, 1.5), ("0.05", 0.05),          # bare numbers are GiB
    ("24GiB", 24.0), ("24G", 24.0), ("24g", 24.0), ("24 gib", 24.0),
    ("800MiB", 800 / 1024), ("800M", 800 / 1024), ("1.5TiB", 1536.0), ("2T", 2048.0), ("512KiB", 512 / 2**20),
    ("2TB", 2e12 / 2**30), ("512GB", 512e9 / 2**30), ("850GB", 850e9 / 2**30), ("800MB", 800e6 / 2**30),
    ("1e3GB", 1e12 / 2**30), ("1073741824B", 1.0), ("1073741824b", 1.0),
])
def test_sizes_parse_to_gib(text, gib):
    assert size_gib("--x", text) == pytest.approx(gib, rel=1e-15)


def test_bare_numbers_are_returned_unchanged():
    # plans made before the convention took bare numbers as GiB: the same figure, bit for bit
    for x in ("24", "0.05", "2000", "1.5"):
        assert size_gib("--x", x) == float(x)


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "-5", "-5GB", "garbage", "", "24 GB GB", "5PB",
                                  "2Tb/s", "1e400", "0x10", True])
def test_bad_sizes_are_user_errors_naming_the_flag(text):
    with pytest.raises(UserError, match="--nvme must be a capacity"):
        size_gib("--nvme", text, allow_zero=True)


def test_zero_is_a_capacity_only_where_allowed():
    assert size_gib("--nvme", "0", allow_zero=True) == 0.0
    with pytest.raises(UserError, match="--vram must be a positive number"):
        size_gib("--vram", "0")
    with pytest.raises(UserError, match="--vram must be a positive number"):
        size_gib("--vram", float("nan"))


def test_an_upper_bound_says_check_the_unit():
    with pytest.raises(UserError, match="absurd.*check the unit"):
        size_gib("--vram", "5000", upper_gib=4096)
    with pytest.raises(UserError, match="absurd"):
        size_gib("--vram", "5TB", upper_gib=4096)  # 4657 GiB
    assert size_gib("--vram", "4TB", upper_gib=4096) == pytest.approx(4e12 / 2**30)


def test_byte_counts_in_messages_have_a_unit():
    assert fmt_bytes(0) == "0 B"
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(3 * 2**20) == "3.00 MiB"
    assert fmt_bytes(257 * 2**30) == "257.00 GiB"
    assert fmt_bytes(1.5 * 2**40) == "1.50 TiB"


@pytest.mark.parametrize("gib", [306.13, 2.1339, 621.1 / 1024, 909.41, 0.002969, 1500.0, 1.0, 0.9999, 1e-7, 65536.0])
def test_a_suggested_size_parses_back_to_enough_and_at_most_a_tenth_of_a_percent_more(gib):
    from planner.units import flag_size
    back = size_gib("--x", flag_size(gib))
    assert gib <= back <= gib * 1.001
