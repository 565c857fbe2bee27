"""planner/plan.py: a plan's JSON round trip, load_plan's errors on damaged files, the fingerprint check,
the block order, and atomic writes."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from planner.errors import UserError
from planner.hardware import make_hardware
from planner.models import CATALOG
from planner.plan import SCHEMA_VERSION, Block, check_fingerprint, load_plan, write_atomic
from planner.planning import Request, make_plan


@pytest.fixture(scope="module")
def plan():
    # the default 1.5 GiB reserve would not fit in a 1 GiB budget
    return make_plan(CATALOG["tiny"], make_hardware(gpu="rtx4090", vram_gib=1),
                     Request(seq_len=64, batch=4, steps_per_block=2, reserve_gib=0.25))


def test_round_trip_through_json_gives_an_equal_plan(plan, tmp_path):
    path = str(tmp_path / "plan.json")
    write_atomic(path, plan.to_json())
    loaded = load_plan(path)
    assert loaded == plan
    assert loaded.to_json() == plan.to_json()
    assert isinstance(loaded.blocks, tuple) and isinstance(loaded.placements, tuple)
    assert loaded.hardware.gpu.id == "rtx4090" and loaded.budget_bytes == 1 << 30
    assert loaded.model.fingerprint() == loaded.fingerprint == CATALOG["tiny"].fingerprint()


def _damaged(plan, tmp_path, edit) -> str:
    raw = json.loads(plan.to_json())
    edit(raw)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(raw))
    return str(path)


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(raw):
        d = raw
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return edit


DAMAGE = [
    ("old schema", _set("schema", 0), r"has schema version 0; this Blockfit reads version 1"),
    ("missing field", lambda raw: raw.pop("order"), r"damaged or incomplete \(KeyError: 'order'\)"),
    ("bad tier", _set("placements", 2, "weights", "ssd"),
     r"invalid plan: layer 2 weights tier 'ssd' is not one of gpu, cpu, nvme"),
    ("bad activation tier", _set("placements", 1, "activations", "nvme"), r"layer 1 activations tier 'nvme'"),
    ("non-contiguous blocks", _set("blocks", [{"first": 1, "last": 1}, {"first": 3, "last": 4}]),
     r"blocks must be contiguous"),
    ("overlapping blocks", _set("blocks", [{"first": 1, "last": 3}, {"first": 3, "last": 4}]),
     r"blocks must be contiguous"),
    ("block past the head", _set("blocks", [{"first": 1, "last": 6}]), r"blocks must be contiguous"),
    ("fingerprint of another model", _set("model", "hidden", 128),
     r"fingerprint does not match its own model config"),
    ("negative micro_batch", _set("shape", "micro_batch", -2), r"shape\.micro_batch must be a positive integer"),
    ("fractional seq_len", _set("shape", "seq_len", 64.5), r"shape\.seq_len must be a positive integer"),
    ("unknown order", _set("order", "shuffled"), r"block order 'shuffled' is not one of"),
    ("placements missing a layer", lambda raw: raw["placements"].pop(), r"placements must list layers 0\.\.5"),
    ("unknown placement key", _set("placements", 0, "colour", "red"), r"damaged or incomplete \(TypeError"),
]


@pytest.mark.parametrize("edit, message", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_damaged_plans_are_refused_with_a_clear_message(plan, tmp_path, edit, message):
    path = _damaged(plan, tmp_path, edit)
    with pytest.raises(UserError, match=message) as e:
        load_plan(path)
    assert f"plan file '{path}'" in str(e.value)



@pytest.mark.parametrize("edit", [_set("blocks", 0, "first", "1"), _set("budget_bytes", "1073741824"),
                                  _set("steps_per_block", None)], ids=["string block", "string budget", "null steps"])
def test_wrongly_typed_numbers_are_a_user_error(plan, tmp_path, edit):
    with pytest.raises(UserError, match="plan file"):
        load_plan(_damaged(plan, tmp_path, edit))


@pytest.mark.parametrize("text, message", [
    ("{\"schema\": 1,", r"is not readable JSON"),
    ("[1, 2]", r"is not a Blockfit plan \(no 'schema' field\)"),
    ("{\"model\": \"tiny\"}", r"is not a Blockfit plan \(no 'schema' field\)"),
], ids=["not json", "not an object", "no schema"])
def test_files_that_are_not_plans(tmp_path, text, message):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_plan(str(path))
    assert str(path) in str(e.value)


def test_missing_plan_file_says_how_to_make_one(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(UserError, match=r"does not exist; write one with `plan \.\.\. --out") as e:
        load_plan(path)
    assert path in str(e.value)


def test_check_fingerprint(plan):
    check_fingerprint(plan, CATALOG["tiny"])
    check_fingerprint(plan, dataclasses.replace(CATALOG["tiny"], name="/ckpt/tiny/config.json"))
    with pytest.raises(UserError, match=r"made for another model \(fingerprint [0-9a-f]{16}, this model's is"):
        check_fingerprint(plan, CATALOG["1b"])
    with pytest.raises(UserError):
        check_fingerprint(plan, dataclasses.replace(CATALOG["tiny"], rope_theta=500000.0))


def _with_blocks(plan, k: int, order: str, seed: int = 0):
    return dataclasses.replace(plan, order=order, seed=seed,
                               blocks=tuple(Block(first=i + 1, last=i + 1) for i in range(k)))


def test_block_order_ascending_and_descending(plan):
    assert _with_blocks(plan, 4, "ascending").block_order(0) == [0, 1, 2, 3]
    assert _with_blocks(plan, 4, "ascending").block_order(7) == [0, 1, 2, 3]
    assert _with_blocks(plan, 4, "descending").block_order(3) == [3, 2, 1, 0]
    assert plan.block_order(0) == list(range(len(plan.blocks)))


def test_block_order_random_is_a_seeded_permutation_per_cycle(plan):
    p = _with_blocks(plan, 4, "random", seed=7)
    orders = [p.block_order(c) for c in range(12)]
    assert all(sorted(o) == [0, 1, 2, 3] for o in orders)
    assert orders == [_with_blocks(plan, 4, "random", seed=7).block_order(c) for c in range(12)]
    assert len({tuple(o) for o in orders}) > 1  # reshuffled between cycles
    other = _with_blocks(plan, 4, "random", seed=8)
    assert [other.block_order(c) for c in range(12)] != orders
    # the order survives the file: a resumed run trains the same blocks in the same order
    again = type(p).from_dict(json.loads(p.to_json()))
    assert [again.block_order(c) for c in range(12)] == orders


def test_write_atomic_leaves_only_the_file(tmp_path):
    path = tmp_path / "plan.json"
    write_atomic(str(path), "first")
    write_atomic(str(path), "second")
    assert path.read_text() == "second"
    assert os.listdir(tmp_path) == ["plan.json"]


def test_write_atomic_errors(tmp_path):
    with pytest.raises(UserError, match=r"directory '.*missing' does not exist"):
        write_atomic(str(tmp_path / "missing" / "plan.json"), "x")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "inside").write_text("keep")
    with pytest.raises(UserError, match=r"cannot write '.*taken'"):
        write_atomic(str(tmp_path / "taken"), "x")  # a directory stands at the path: the rename fails
    assert sorted(os.listdir(tmp_path)) == ["taken"]  # and its temporary file is gone


def test_schema_version_is_written(plan):
    assert json.loads(plan.to_json())["schema"] == SCHEMA_VERSION == 1
