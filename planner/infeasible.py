"""Why no plan fits: the resource that binds (VRAM, host RAM, NVMe) and the smallest figure of it that would do.

planning.make_plan calls `explain_infeasible` when its search finds nothing; the message it returns is what the
user reads (exit 2), so each figure in it comes from a solver run, not an estimate."""
from __future__ import annotations

import dataclasses
import math

from planner import ilp, memory
from planner.errors import UserError
from planner.hardware import GIB, gpu_names, load_gpu
from planner.units import flag_size, fmt_bytes


def explain_infeasible(prof, hw, req, budget, reserve) -> UserError:
    """Why nothing fits, naming the resource that binds and the smallest figure of it that would do.

    A resource binds when relaxing it alone (everything else as given) makes a plan feasible. VRAM: the ILP
    minimising the worst phase's device bytes gives the smallest budget exactly. Host RAM and NVMe: feasibility is
    monotone in each capacity, so bisect on it with the ILP's feasibility check (a check that runs out of time
    counts as infeasible: the figure reported is one a solver proved sufficient). All three on the smallest
    micro-batch and the finest partition allowed, which need the least memory."""
    from planner.planning import _problem, candidates  # the search's own subproblems (planning calls this)
    host_usable, nvme_usable = memory.Tier.CPU.usable_fraction, memory.Tier.NVME.usable_fraction
    what = f"{prof.model.name} ({req.method}, micro-batch {candidates(req)[0]}, sequence {req.seq_len}" + (
        f", {req.gpus} GPUs on {req.nodes} node(s): VRAM per GPU, host RAM and NVMe per node)" if req.gpus > 1
        else ")")
    trained = sum(lp.params for lp in prof.layers if req.method == "full" or lp.kind == "decoder")
    if req.switch_state == "keep_nvme" and hw.host.nvme_gib <= 0:
        need = trained * memory.STATE_BYTES / nvme_usable
        return UserError(
            f"--switch-state keep_nvme keeps every block's optimizer state (fp32 master and AdamW moments, "
            f"{memory.STATE_BYTES} bytes per trained parameter) on an NVMe tier, and this plan has none: give one "
            f"of at least {fmt_bytes(need)} for {what} with --nvme {flag_size(need / GIB)} or more, or use "
            f"--switch-state reset or keep_cpu.")
    mb = candidates(req)[0]
    u = 1 if req.method == "full" else min(prof.n_decoder, req.max_blocks or prof.n_decoder)
    limit = min(2.0, req.time_limit_s)

    def fitting(h, ts) -> list[str]:
        """The tiers of `ts` in which a plan fits on hardware `h` (on a cluster, sharded or not, as the search
        chooses: ilp.state_choices)."""
        pb = _problem(prof, h, req, mb, budget - reserve)
        return [t for t in ts if any(getattr(ilp.solve(pb, u, c, own=own, time_limit_s=limit, feasibility=True),
                                             "status", "UNKNOWN") != "UNKNOWN"
                                     for c in ilp.state_choices(pb) if ilp._state(c)[0] == t
                                     for own in ilp.layouts(pb))]

    def smallest(field: str, top: float) -> float | None:
        """The smallest capacity (GiB) of host.<field> that fits, to 0.2% (None if even `top` does not)."""
        def hw_at(x):
            return dataclasses.replace(hw, host=dataclasses.replace(hw.host, **{field: x}))
        ts = fitting(hw_at(top), memory.tiers(hw_at(top)))  # only these tiers can fit below `top`

        def at(x):
            return any(fitting(hw_at(x), [t]) for t in ts if t in memory.tiers(hw_at(x)))
        if not ts:
            return None
        # bisect on a log scale: capacities span KiB (tests) to TiB; what is given does not fit
        lo, hi = max(getattr(hw.host, field), 2.0**-20), top
        while hi > lo * 1.002:
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if at(mid) else (mid, hi)
        return hi

    pb = _problem(prof, hw, req, mb, 1 << 62)
    peaks = [sol.objective_s for t in ilp.state_choices(pb) for own in ilp.layouts(pb)
             if (sol := ilp.solve(pb, u, t, own=own, time_limit_s=limit, min_memory=True)) is not None
             and sol.status != "UNKNOWN"]
    vram = (min(peaks) + reserve) / GIB if peaks else None
    if vram is not None and min(peaks) <= budget - reserve:
        return UserError(
            f"the search found no plan for {prof.model.name} within its time limit ({req.time_limit_s:g} s), but one "
            f"exists: with micro-batch {mb} and everything offloadable offloaded, {fmt_bytes(vram * GIB)} of the "
            f"{fmt_bytes(budget)} VRAM budget suffice with this host. Give the solver more time (--time-limit).")
    host = smallest("ram_gib", 65536.0)
    nvme = smallest("nvme_gib", 10.0**6)
    have = (f"a {fmt_bytes(budget)} VRAM budget ({fmt_bytes(reserve)} reserved), {fmt_bytes(hw.host.ram_gib * GIB)} "
            f"host RAM ({fmt_bytes(hw.host.ram_gib * GIB * host_usable)} usable) and "
            + (f"{fmt_bytes(hw.host.nvme_gib * GIB)} NVMe" if hw.host.nvme_gib > 0 else "no NVMe tier"))
    card = load_gpu(hw.gpu.id) if hw.gpu.id in gpu_names() else None  # the catalog card (--vram overrides hw's)
    # each resource that binds alone, the smallest increase (as a factor of what is given) first
    binds = []
    if host is not None:
        binds.append((host / hw.host.ram_gib, f"host RAM binds: with --host-ram {flag_size(host)} "
                      f"({fmt_bytes(host * GIB * host_usable)} usable) it plans"))
    if nvme is not None:
        binds.append((nvme / hw.host.nvme_gib if hw.host.nvme_gib > 0 else math.inf,
                      f"NVMe binds: with --nvme {flag_size(nvme)} ({fmt_bytes(nvme * GIB * nvme_usable)} "
                      f"usable) it plans" + ("" if hw.host.nvme_gib > 0 else ", weights and optimizer state "
                                             "leaving host RAM for the drive")))
    if vram is not None:
        binds.append((vram * GIB / budget, f"VRAM binds: the smallest budget that is feasible here is "
                      f"{vram:.4g} GiB (--vram {flag_size(vram)}; with micro-batch {mb}, everything "
                      f"offloadable offloaded and activations recomputed" + (
                          f"; more than the {card.name}'s {card.vram_gib:g} GiB" if card and vram > card.vram_gib
                          else "") + ")"))
    binds.sort(key=lambda x: x[0])
    free = [name for name, figure in (("host RAM (--host-ram)", host), ("NVMe (--nvme)", nvme)) if figure is None]
    tips = ([f"more {' or '.join(free)} alone does not make it fit"] if free else []) + (
        ["a shorter sequence (--seq) needs less of each"] if req.seq_len > 512 else [])
    if not binds:
        return UserError(
            f"no plan fits {what} with {have}, and no one of VRAM, host RAM and NVMe alone would make it fit "
            f"(each tried up to its flag's limit): give more of several, or a shorter sequence (--seq).")
    return UserError(
        f"no plan fits {what} with {have}. One resource at a time, everything else as given: "
        f"{'; '.join(b for _, b in binds)}." + (f" Also: {'; '.join(tips)}." if tips else ""))
