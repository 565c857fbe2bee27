"""A checkpoint is durable in the order that makes `latest` trustworthy after a power cut, checked by behaviour.

os.fsync, os.rename and os.replace are intercepted and each fsync is resolved to the path its descriptor names
(/proc/self/fd), so the test sees *what* was made durable and *when*, not how many calls were made:
  every file of the step is fsynced before its directory is renamed into place;
  the checkpoint directory is fsynced after that rename, before `latest` moves (so `latest` never names a
  directory entry that a crash could lose);
  `latest`'s new content is fsynced before it is moved over the old one;
  the checkpoint directory is fsynced after `latest` moves (else the move itself can be lost).
"""
from __future__ import annotations

import os

import pytest
import torch

from runtime.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name descriptors")


def _record(monkeypatch):
    events: list[tuple] = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def on_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    def on_move(real, kind):
        def move(src, dst, *a, **kw):
            out = real(src, dst, *a, **kw)
            events.append((kind, os.path.realpath(os.fspath(src)), os.path.realpath(os.fspath(dst))))
            return out
        return move
    monkeypatch.setattr(os, "fsync", on_fsync)
    monkeypatch.setattr(os, "rename", on_move(rename, "move"))
    monkeypatch.setattr(os, "replace", on_move(replace, "move"))
    return events


def _index(events, pred, start=0) -> int:
    return next((k for k in range(start, len(events)) if pred(events[k])), -1)


@pytest.mark.parametrize("again", [False, True])
def test_checkpoint_and_latest_are_made_durable_in_order(tmp_path, monkeypatch, again):
    ckpt = os.path.realpath(tmp_path / "ck")
    if again:  # a second checkpoint over an existing one takes the same path
        save_checkpoint(ckpt, 1, weights={"w": torch.zeros(4)}, optimizer={}, meta={})
    events = _record(monkeypatch)
    step_dir = save_checkpoint(ckpt, 2, weights={"w": torch.ones(4)}, optimizer={"m": torch.zeros(4)},
                               meta={"s": 2})
    final = os.path.realpath(step_dir)
    latest = os.path.join(ckpt, "latest")

    # the step directory's rename into place, and what was synced before it
    k_dir = _index(events, lambda e: e[0] == "move" and e[2] == final)
    assert k_dir >= 0, events
    tmp_dir = events[k_dir][1]
    synced_before = {e[1] for e in events[:k_dir] if e[0] == "fsync"}
    files = [os.path.join(tmp_dir, name) for name in os.listdir(final)]
    assert files and all(f in synced_before for f in files), (files, synced_before)
    assert tmp_dir in synced_before                       # the new directory's own entries

    # `latest`: its content synced before the move, the parent directory synced between the two renames
    k_latest = _index(events, lambda e: e[0] == "move" and e[2] == latest)
    assert k_latest > k_dir, events
    latest_src = events[k_latest][1]
    assert ("fsync", latest_src) in events[:k_latest]
    assert k_dir < _index(events, lambda e: e == ("fsync", ckpt), k_dir) < k_latest

    # ... and the directory of `latest` synced after `latest` moved
    assert _index(events, lambda e: e == ("fsync", ckpt), k_latest + 1) > k_latest, events[k_latest:]
    assert load_checkpoint(ckpt).step == 2
