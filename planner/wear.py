"""NVMe wear: the bytes a plan writes to its drive, per optimizer step and per day, against the drive's endurance.

Flash wears by what is written to it. A drive's endurance is rated in TBW (terabytes written over its warranty):
1,200 TBW for the common 2 TB Gen4 drives (Samsung 990 PRO 2 TB, WD Black SN850X 2 TB datasheets; five-year
warranty), so a drive is used as rated when it takes at most TBW / (5 x 365.25) a day, 0.66 TB for 1,200 TBW.

What a plan writes is in its schedule, and only there: every op on the `nvme_write` stream (optimizer state
written back after each step of a block whose state lives on NVMe, trained weights written back to NVMe, state
saved at a block switch under keep_nvme). One cycle trains every block steps_per_block steps and switches once
per block, so
    bytes per cycle = sum over phases (steps_per_block x step's writes + switch writes),
    bytes per step  = bytes per cycle / (blocks x steps_per_block)   (a mean over the cycle),
    bytes per day   = bytes per cycle / cycle seconds x 86,400        (at the predicted rate)."""
from __future__ import annotations

import math

SECONDS_PER_DAY = 86_400
WARRANTY_DAYS = 5 * 365.25
DEFAULT_TBW = 1200.0      # TB written: a 2 TB Gen4 drive's rating (above)


def write_bytes_per_cycle(schedule, steps_per_block: int) -> int:
    """Bytes written to NVMe over one cycle of the schedule (module docstring)."""
    total = 0
    for ph in schedule.phases:
        total += steps_per_block * sum(op.bytes for op in ph.ops if op.stream == "nvme_write")
        total += sum(op.bytes for op in ph.switch_ops if op.stream == "nvme_write")
    return total


def per_step_and_day(schedule, *, steps_per_block: int, cycle_seconds: float) -> tuple[int, float]:
    """(mean bytes written per optimizer step, bytes written per day at the predicted rate)."""
    cycle = write_bytes_per_cycle(schedule, steps_per_block)
    steps = len(schedule.phases) * steps_per_block
    per_day = cycle / cycle_seconds * SECONDS_PER_DAY if cycle_seconds > 0 else (math.inf if cycle else 0.0)
    return (cycle // steps if steps else 0), per_day


def days_to_wear_out(per_day_bytes: float, tbw: float) -> float:
    """Days of training until the drive has taken its rated `tbw` terabytes (decimal: 10^12 bytes)."""
    return math.inf if per_day_bytes <= 0 else tbw * 1e12 / per_day_bytes


def wear_warning(per_day_bytes: float, tbw: float) -> str | None:
    """A warning when a day's writes exceed what the drive is rated to take a day (TBW over its warranty)."""
    if per_day_bytes * WARRANTY_DAYS <= tbw * 1e12:
        return None
    days = days_to_wear_out(per_day_bytes, tbw)
    return (f"this plan writes {per_day_bytes / 1e12:,.1f} TB a day to NVMe, more than a {tbw:,.0f} TBW drive is "
            f"rated for ({tbw / WARRANTY_DAYS:.2f} TB a day over a five-year warranty): it wears out in about "
            f"{days:,.0f} days of training. Set the drive's rating with --nvme-tbw, cap the writes with "
            f"--max-nvme-writes-per-day, or keep optimizer state off NVMe (more --host-ram).")
