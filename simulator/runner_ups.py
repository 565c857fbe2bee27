"""Why the runner-ups of `blockfit cheapest` lose, in words: the winner's neighbours, the best of every other GPU
and method, and what to change when nothing meets the deadline (the search is simulator/cheapest.py)."""
from __future__ import annotations

import dataclasses
import math

from planner.errors import UserError
from simulator.cheapest import Candidate, Result, rank
from simulator.cost import human_seconds


def why_it_loses(c: Candidate, winner: Candidate | None, deadline_seconds: float) -> str:
    """One phrase: does not fit, over the deadline (by how much), or dearer than the winner (by how much)."""
    if not c.fits:
        return f"does not fit: {c.reason}"
    what = "perfect scaling over nodes" if c.method == "bcd" else "the matmuls' peak"
    if c.bound == "deadline":
        return (f"over the deadline even at {what} ({c.bound_tokens_per_s:,.0f} tokens/s: "
                f"{human_seconds(c.seconds)} or more)")
    if c.bound == "cost":
        return f"dearer even at {what}: ${c.usd:,.0f} or more" + (
            "" if winner is None else f" (+{c.usd / winner.usd - 1:.0%} or more)")
    if not c.meets:
        return f"over the deadline: {human_seconds(c.seconds)} ({c.seconds / deadline_seconds:.2f}x the deadline)"
    if winner is None or c is winner:
        return ""
    more = c.usd - winner.usd
    if more < 0.01:
        return "as cheap, to the cent (the winner is ranked first: sooner, or fewer GPUs or nodes)"
    money = f"${more:,.2f}" if more < 100 else f"${more:,.0f}"
    return f"dearer: {money} more (+{more / winner.usd:.1%})" if winner.usd > 0 else "dearer"


def runner_ups(r: Result, k: int = 5) -> list[tuple[Candidate, str]]:
    """Why the rest lose, one line a choice: within the winner's GPU and method, the next cheapest layout that
    meets the deadline, the cheapest with more GPUs a node (why not fuller nodes) and the largest count that
    misses it (why not fewer GPUs); then the best of every other
    GPU and method (the cheapest that meets the deadline, else its bound's cost where that ruled it out, else
    the fastest, else why nothing fits), up to k of each kind, and every one that fits nowhere."""
    w = r.winner
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for c in r.candidates:
        groups.setdefault((c.gpu, c.method), []).append(c)
    lines: list[Candidate] = []
    if w is not None:
        own = groups.pop((w.gpu, w.method))
        lines += [c for c in own if c.meets and c is not w][:1]
        dense = [c for c in own if c.meets and c.gpus // c.nodes > w.gpus // w.nodes]   # why not fuller nodes
        lines += [min(dense, key=rank)] if dense and min(dense, key=rank) not in lines else []
        lines += sorted((c for c in own if c.fits and not c.meets and c.gpus < w.gpus), key=lambda c: -c.gpus)[:1]
    meets, dearer, misses, nofit = [], [], [], []
    for cs in groups.values():
        fit = [c for c in cs if c.fits]
        if any(c.meets for c in fit):
            meets.append(min((c for c in fit if c.meets), key=rank))
        elif any(c.bound == "cost" for c in fit):
            dearer.append(min((c for c in fit if c.bound == "cost"), key=lambda c: c.usd))
        elif fit:
            misses.append(min(fit, key=lambda c: (c.seconds, c.gpus)))
        else:
            nofit.append(cs[0])
    lines += (sorted(meets, key=rank)[:k] + sorted(dearer, key=lambda c: c.usd)[:k]
              + sorted(misses, key=lambda c: c.seconds)[:k] + nofit)
    return [(c, why_it_loses(c, w, r.deadline_seconds)) for c in lines]


def to_dict(r: Result) -> dict:
    def cand(c: Candidate) -> dict:
        d = dataclasses.asdict(c)
        d["why"] = why_it_loses(c, r.winner, r.deadline_seconds)
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}
    return {"model": r.model, "tokens": r.tokens, "deadline_seconds": r.deadline_seconds,
            "winner": None if r.winner is None else cand(r.winner),
            "runner_ups": [cand(c) for c, _ in runner_ups(r)], "candidates": [cand(c) for c in r.candidates],
            "plans": r.plans, "simulated": r.simulated, "wall_seconds": r.wall_seconds,
            "skipped_gpus": list(r.skipped_gpus)}


def none_meets(r: Result) -> UserError:
    """The exit-2 message when no configuration meets the deadline: the fastest one and what to change."""
    fit = [c for c in r.candidates if c.fits and c.tokens_per_s > 0]
    if not fit:
        return UserError(f"nothing fits: no configuration of {r.model} could be planned on the GPUs searched "
                         f"({'; '.join(sorted({f'{c.gpu} {c.method}: {c.reason}' for c in r.candidates}))}).")
    best = min(fit, key=lambda c: c.seconds)
    return UserError(f"no configuration trains {r.model} on {r.tokens:.3g} tokens within "
                     f"{human_seconds(r.deadline_seconds)}: the fastest searched, {best.layout} with "
                     f"{best.method.upper() if best.method == 'bcd' else 'full-parameter training'}, takes "
                     f"{human_seconds(best.seconds)} (${best.usd:,.0f}). Give a later --deadline, fewer --tokens, "
                     f"or a larger --gpus-max.")
