"""The ledger on a real Redis: version 0, content-addressed deltas, compare-and-set commits."""

from __future__ import annotations

import threading

import pytest
import torch

from factpatch.editing import Delta
from factpatch.ledger import (
    CorruptBlobError,
    Ledger,
    LedgerMismatchError,
    StaleHeadError,
    UnknownEditError,
    UnknownVersionError,
    snapshot,
)
from factpatch.store import EmbeddedRedis


def rank_one(path: str, out: int = 6, inp: int = 4, seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    left, right = torch.randn(out, 1, generator=g), torch.randn(inp, 1, generator=g)
    return Delta({path: (left, right)}, {"seed": seed})


def test_init_creates_version_zero_once_and_checks_the_base(ledger: Ledger):
    zero = ledger.init("a" * 64, "m")
    assert (zero.number, zero.parent, zero.edits, zero.cause["kind"]) == (0, None, (), "base")
    assert ledger.init("a" * 64, "m") == zero  # idempotent
    assert ledger.head() == 0
    with pytest.raises(LedgerMismatchError, match="belongs to base weights"):
        ledger.init("b" * 64, "other")


def test_edits_are_stored_once_by_content(ledger: Ledger):
    ledger.init("a" * 64, "m")
    delta = rank_one("w", seed=1)
    first = ledger.put_edit(delta, [{"target": "Rome"}], computed_on=0)
    again = ledger.put_edit(rank_one("w", seed=1), [{"target": "Rome"}], computed_on=0)
    assert first == again and first.id == delta.digest()
    assert ledger.redis.hlen(ledger.k_blobs) == 1
    loaded = ledger.delta(first.id)
    assert torch.equal(loaded.factors["w"][0], delta.factors["w"][0])


def test_commit_is_compare_and_set_and_numbers_are_never_reused(ledger: Ledger):
    ledger.init("a" * 64, "m")
    e1 = ledger.put_edit(rank_one("w", seed=1), [{}], 0).id
    v1 = ledger.commit(0, [e1], {"kind": "edit"}, {"w": "h1"}).version
    assert (v1.number, v1.parent, v1.edits) == (1, 0, (e1,))
    with pytest.raises(StaleHeadError, match="expected version 0, the head is 1"):
        ledger.commit(0, [], {"kind": "rollback", "to": 0}, {"w": "h0"})
    v2 = ledger.commit(1, [], {"kind": "rollback", "to": 0}, {"w": "h0"}).version
    assert v2.number == 2 and ledger.head() == 2
    assert [v.number for v in ledger.versions()] == [0, 1, 2]
    assert ledger.get(1) == v1  # immutable: unchanged by later commits


def test_two_writers_on_the_same_head_exactly_one_wins(ledger: Ledger):
    ledger.init("a" * 64, "m")
    ids = [ledger.put_edit(rank_one("w", seed=s), [{}], 0).id for s in range(8)]
    barrier, outcomes = threading.Barrier(len(ids)), []

    def writer(edit_id: str) -> None:
        barrier.wait()
        try:
            ledger.commit(0, [edit_id], {"kind": "edit"}, {"w": edit_id})
            outcomes.append(("won", edit_id))
        except StaleHeadError:
            outcomes.append(("stale", edit_id))

    threads = [threading.Thread(target=writer, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [e for outcome, e in outcomes if outcome == "won"]
    assert len(winners) == 1 and len(outcomes) == len(ids)
    assert ledger.head() == 1 and ledger.get(1).edits == (winners[0],)


def test_idempotency_key_never_makes_two_versions(ledger: Ledger):
    ledger.init("a" * 64, "m")
    e1 = ledger.put_edit(rank_one("w", seed=1), [{}], 0).id
    first = ledger.commit(0, [e1], {"kind": "edit"}, {"w": "h"}, idempotency_key="job-1")
    again = ledger.commit(1, [e1], {"kind": "edit"}, {"w": "h"}, idempotency_key="job-1")
    assert first.created and not again.created
    assert again.version == first.version and ledger.head() == 1
    assert ledger.committed("job-1") == 1 and ledger.committed("job-2") is None


def test_bad_commits_change_nothing(ledger: Ledger):
    ledger.init("a" * 64, "m")
    with pytest.raises(UnknownEditError, match="edits: "):
        ledger.commit(0, ["f" * 64], {"kind": "edit"}, {})
    with pytest.raises(ValueError, match=r"cause\.kind"):
        ledger.commit(0, [], {"kind": "whim"}, {})
    e1 = ledger.put_edit(rank_one("w", seed=1), [{}], 0).id
    ledger.commit(0, [e1], {"kind": "edit"}, {"w": "h"})
    with pytest.raises(ValueError, match="hashes: missing"):
        ledger.commit(1, [], {"kind": "revert", "edit": e1}, {})
    with pytest.raises(UnknownVersionError, match="version: 7"):
        ledger.get(7)
    assert ledger.head() == 1


def test_corrupt_blob_is_detected(ledger: Ledger):
    ledger.init("a" * 64, "m")
    delta = rank_one("w", seed=3)
    edit_id = ledger.put_edit(delta, [{}], 0).id
    tampered = Delta({"w": (delta.factors["w"][0] * 2, delta.factors["w"][1])}, delta.provenance)
    ledger.redis.hset(ledger.k_blobs, edit_id, tampered.to_bytes())
    with pytest.raises(CorruptBlobError, match="does not match its id"):
        ledger.delta(edit_id)
    ledger.redis.hset(ledger.k_blobs, edit_id, b"garbage")
    with pytest.raises(CorruptBlobError, match="unreadable"):
        ledger.delta(edit_id)


def test_diff_names_added_removed_and_changed_modules(ledger: Ledger):
    ledger.init("a" * 64, "m")
    e1 = ledger.put_edit(rank_one("w1", seed=1), [{}], 0).id
    e2 = ledger.put_edit(rank_one("w2", seed=2), [{}], 1).id
    ledger.commit(0, [e1], {"kind": "edit"}, {"w1": "x"})
    ledger.commit(1, [e1, e2], {"kind": "edit"}, {"w1": "x", "w2": "y"})
    ledger.commit(2, [e2], {"kind": "revert", "edit": e1}, {"w1": "base", "w2": "y"})
    assert ledger.diff(1, 3) == {
        "from": 1,
        "to": 3,
        "added": [e2],
        "removed": [e1],
        "changed_modules": ["w1", "w2"],
    }


def test_ledger_survives_a_redis_restart(tmp_path):
    with EmbeddedRedis(tmp_path / "r") as server:
        ledger = Ledger(server.client(), "persist")
        ledger.init("a" * 64, "m")
        e1 = ledger.put_edit(rank_one("w", seed=1), [{"target": "Rome"}], 0).id
        ledger.commit(0, [e1], {"kind": "edit"}, {"w": "h"}, idempotency_key="k")
    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        ledger = Ledger(server.client(), "persist")
        assert ledger.head() == 1 and ledger.get(1).edits == (e1,)
        assert ledger.delta(e1).digest() == e1
        assert ledger.committed("k") == 1
    finally:
        server.stop()


def test_ledger_survives_redis_being_killed(tmp_path):
    """appendfsync always: a write Redis acknowledged is on disk even after SIGKILL."""
    server = EmbeddedRedis(tmp_path / "r").start()
    ledger = Ledger(server.client(), "persist")
    ledger.init("a" * 64, "m")
    e1 = ledger.put_edit(rank_one("w", seed=1), [{}], 0).id
    ledger.commit(0, [e1], {"kind": "edit"}, {"w": "h"})
    server.stop(kill=True)
    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        assert Ledger(server.client(), "persist").head() == 1
    finally:
        server.stop()


def test_export_import_round_trip_is_verified(ledger: Ledger, tmp_path):
    ledger.init("a" * 64, "m")
    e1 = ledger.put_edit(rank_one("w", seed=1), [{"target": "Rome"}], 0).id
    e2 = ledger.put_edit(rank_one("w", seed=2), [{"target": "Oslo"}], 1).id
    ledger.commit(0, [e1], {"kind": "edit"}, {"w": "h1"}, idempotency_key="k1")
    ledger.commit(1, [e1, e2], {"kind": "edit"}, {"w": "h2"})
    manifest = snapshot.export(ledger, tmp_path / "snap")
    assert manifest["head"] == 2 and len(manifest["edits"]) == 2

    other = Ledger(ledger.redis, name=ledger.name + "-copy")
    assert snapshot.import_(other, tmp_path / "snap") == 2
    assert other.versions() == ledger.versions()
    assert other.delta(e2).digest() == e2 and other.committed("k1") == 1
    with pytest.raises(snapshot.SnapshotError, match="already has versions"):
        snapshot.import_(other, tmp_path / "snap")
    with pytest.raises(FileExistsError, match="folder: "):
        snapshot.export(ledger, tmp_path / "snap")


def test_import_refuses_an_altered_snapshot_and_writes_nothing(ledger: Ledger, tmp_path):
    ledger.init("a" * 64, "m")
    delta = rank_one("w", seed=1)
    e1 = ledger.put_edit(delta, [{}], 0).id
    ledger.commit(0, [e1], {"kind": "edit"}, {"w": "h1"})
    snapshot.export(ledger, tmp_path / "snap")
    blob = tmp_path / "snap" / "edits" / f"{e1}.safetensors"
    original = blob.read_bytes()
    blob.write_bytes(original[:-4] + b"\0\0\0\1")
    target = Ledger(ledger.redis, name=ledger.name + "-copy")
    with pytest.raises(snapshot.SnapshotError, match="file sha256"):
        snapshot.import_(target, tmp_path / "snap")
    assert target.redis.exists(target.k_head, target.k_edits, target.k_blobs) == 0
    blob.write_bytes(original)
    target.init("b" * 64, "other")
    with pytest.raises(LedgerMismatchError, match="import: "):
        snapshot.import_(target, tmp_path / "snap")
