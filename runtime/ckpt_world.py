"""A checkpoint across ranks: which rank writes which file, how the ranks agree that a save stage succeeded, and
what each rank resumes with, on the same world size or another.

runtime.checkpoint writes and reads the files; this module holds the rules that depend on the world: the
optimizer file of a rank's shard, the small file through which a rank hands its digests and its own meta to
rank 0, the agreement that ends each stage of a save, the world a manifest records, and the data position and
RNG states a rank takes back.
"""
from __future__ import annotations

import shutil

from safetensors import SafetensorError

from planner.errors import UserError
from runtime.dist import World, failed_ranks


def shard_file(rank: int, shards: int) -> str:
    """The optimizer file of one rank's shard ('optimizer.safetensors' when the state is not sharded)."""
    return "optimizer.safetensors" if shards == 1 else f"optimizer-rank{rank:05d}-of-{shards:05d}.safetensors"


def rank_file(rank: int) -> str:
    """Where rank `rank` (> 0) hands its file digests and own meta to rank 0 inside the temporary directory."""
    return f"rank{rank:05d}.json"


class Stage:
    """One stage of a save, ended by every rank's agreement that it succeeded (an all-reduce of failures when
    torch.distributed is up, a barrier in effect: no rank's file is trusted before every rank's is durable).
    A failure anywhere raises the same UserError on every rank, names the ranks that failed, and removes the
    temporary directory, so a full disk never leaves a half checkpoint or a rank waiting for the others."""

    def __init__(self, ckpt_dir: str, step: int, world: World, tmp: str, previous):
        self.ckpt_dir, self.step, self.world, self.tmp, self.previous = ckpt_dir, step, world, tmp, previous
        self.committed = False   # the temporary directory has become the step directory

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if kind is not None and not issubclass(kind, (OSError, SafetensorError, KeyError, ValueError)):
            return False  # a bug or an interrupt: let it through as it is
        failed = failed_ranks(self.world, kind is None)
        if not failed:
            return False
        if self.world.rank == 0 and not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)  # give the space back
        why = (getattr(err, "strerror", None) or " ".join(str(err).split())) if err is not None else \
            "see the message of the rank that failed"
        who = "" if self.world.size == 1 else \
            f"rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} of {self.world.size} failed: "
        raise UserError(f"could not write checkpoint {self.step} under '{self.ckpt_dir}' ({who}{why}); "
                        f"{self.previous(self.ckpt_dir)} Check the directory's permissions and free space.") from None


def saved_world(step_dir: str, raw: dict) -> dict:
    """The manifest's world: ranks that saved it, optimizer shards (1 or that many), each state's flat length,
    and with several ranks each one's own record (data position, RNG states)."""
    w = raw.get("world", {"size": 1, "optimizer_shards": 1, "optimizer_numel": {}})
    ok = isinstance(w, dict) and _pos_int(w.get("size")) and w.get("optimizer_shards") in (1, w.get("size")) \
        and isinstance(w.get("optimizer_numel", {}), dict) \
        and all(_pos_int(n) for n in w.get("optimizer_numel", {}).values())
    if not ok:
        raise UserError(f"checkpoint '{step_dir}': meta.json's 'world' {str(w)[:200]} is not a world size with "
                        f"1 or that many optimizer shards.")
    ranks = w.get("ranks")
    if w["size"] > 1 and (not isinstance(ranks, list) or len(ranks) != w["size"]
                          or not all(isinstance(r, dict) for r in ranks)):
        raise UserError(f"checkpoint '{step_dir}': meta.json lists no data position and RNG state for each of "
                        f"its {w['size']} ranks.")
    return {"optimizer_numel": {}, **w}


def rank_view(step_dir: str, meta: dict, saved: dict, world: World, note: str) -> str:
    """Put this rank's data position and RNG states into meta; returns the note, extended when the world
    changed. The data state every rank saves is the global position (the same on each: ranks take disjoint
    windows of one order), so any world size continues from it without skipping or repeating a sequence."""
    saved_size, ranks = saved["size"], saved.get("ranks")
    if saved_size == world.size:
        if ranks:
            meta.update(ranks[world.rank])
        return note
    ranks = ranks or [{"data": meta.get("data"), "rng": meta.get("rng")}]
    if any(r.get("data") != ranks[0].get("data") for r in ranks):
        raise UserError(f"checkpoint '{step_dir}': its {saved_size} ranks saved different data positions, so "
                        f"there is no global position to continue from on {world.size} ranks.")
    meta.update({"data": ranks[0].get("data"), "rng": ranks[min(world.rank, saved_size - 1)].get("rng")})
    data = meta["data"] if isinstance(meta["data"], dict) else {}
    return (f"checkpoint '{step_dir}' was saved by {saved_size} rank{'s' if saved_size > 1 else ''} and resumes "
            f"on {world.size}: {note + '; ' if note else ''}the data continue from the global position (epoch "
            f"{data.get('epoch')}, window {data.get('position')}), so no sequence is skipped or repeated")


def _pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1
