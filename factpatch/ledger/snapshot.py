"""Portable ledger snapshots: a folder anyone can copy, check and load elsewhere.

Layout::

    DIR/manifest.json              format, ledger name, base hash, model, head, every version,
                                   every edit record with its file's sha256, idempotency keys,
                                   check reports, protected facts
    DIR/edits/<edit id>.safetensors  one delta each (factors + provenance)

``export`` writes into a temporary sibling folder and renames it into place, so a snapshot is
complete or absent.  ``import_`` checks everything before writing anything: file hashes, each
delta's content address, the version chain (0…head, parent = n−1, one base), that every
version's edits are in the snapshot; then writes it all in one Redis transaction into a ledger
that has no versions beyond 0 of the same base.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import redis

from factpatch.editing.delta import Delta
from factpatch.ledger.ledger import EditRecord, Ledger, LedgerError, LedgerMismatchError, Version
from factpatch.ledger.protected import ProtectedFact, ProtectedFacts, fact_id

FORMAT = 1


class SnapshotError(LedgerError):
    """A snapshot is incomplete, altered, or does not fit the target ledger."""


def export(ledger: Ledger, folder: str | Path) -> dict[str, Any]:
    """Write the whole ledger to ``folder`` (which must not exist); returns the manifest."""
    folder = Path(folder)
    if folder.exists():
        raise FileExistsError(f"folder: {folder} already exists")
    versions = ledger.versions()
    edit_ids = sorted({e for v in versions for e in v.edits} | set(_all_edit_ids(ledger)))
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent or "."))
    try:
        (tmp / "edits").mkdir()
        edits = []
        for edit_id in edit_ids:
            blob = ledger.blob(edit_id)
            (tmp / "edits" / f"{edit_id}.safetensors").write_bytes(blob)
            record = json.loads(ledger.edit(edit_id).to_json())
            edits.append({**record, "sha256": hashlib.sha256(blob).hexdigest()})
        idem = {k.decode(): int(v) for k, v in ledger.redis.hgetall(ledger.k_idem).items()}
        manifest = {
            "format": FORMAT,
            "ledger": ledger.name,
            "base_hash": versions[0].base_hash,
            "model": versions[0].model,
            "head": versions[-1].number,
            "versions": [json.loads(v.to_json()) for v in versions],
            "edits": edits,
            "idempotency": idem,
            "base_hashes": ledger.base_hashes(),
            "reports": {
                k.decode(): json.loads(v) for k, v in ledger.redis.hgetall(ledger.k_reports).items()
            },
            "protected": [json.loads(f.to_json()) for f in ProtectedFacts(ledger).list()],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _all_edit_ids(ledger: Ledger) -> list[str]:
    return [k.decode() for k in ledger.redis.hkeys(ledger.k_edits)]


def verify(folder: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Check a snapshot completely; returns its manifest and the delta blobs by id."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SnapshotError(f"manifest.json: unreadable ({err})") from err
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"manifest.json: format {manifest.get('format')!r} != {FORMAT}")
    blobs = {}
    for record in manifest["edits"]:
        path = folder / "edits" / f"{record['id']}.safetensors"
        try:
            blob = path.read_bytes()
        except OSError as err:
            raise SnapshotError(f"edits/{path.name}: missing") from err
        if hashlib.sha256(blob).hexdigest() != record["sha256"]:
            raise SnapshotError(f"edits/{path.name}: file sha256 does not match the manifest")
        try:
            digest = Delta.from_bytes(blob).digest()
        except Exception as err:
            raise SnapshotError(f"edits/{path.name}: unreadable delta ({err})") from err
        if digest != record["id"]:
            raise SnapshotError(f"edits/{path.name}: content does not match its id")
        blobs[record["id"]] = blob
    versions = [Version.from_json(json.dumps(v)) for v in manifest["versions"]]
    if [v.number for v in versions] != list(range(len(versions))) or not versions:
        raise SnapshotError("versions: must be numbered 0…head without gaps")
    if versions[-1].number != manifest["head"]:
        raise SnapshotError("head: does not match the last version")
    for v in versions:
        if v.number and v.parent != v.number - 1:
            raise SnapshotError(f"versions: {v.number} has parent {v.parent}")
        if v.base_hash != manifest["base_hash"]:
            raise SnapshotError(f"versions: {v.number} names another base")
        missing = [e for e in v.edits if e not in blobs]
        if missing:
            raise SnapshotError(f"versions: {v.number} refers to edits not in the snapshot")
    for report_id, report in manifest.get("reports", {}).items():
        text = json.dumps(report, sort_keys=True)
        if hashlib.sha256(text.encode()).hexdigest() != report_id:
            raise SnapshotError(f"reports: {report_id[:16]} does not match its content")
    for fact in manifest.get("protected", []):
        if fact_id(fact["prompt"], fact["answer"]) != fact["id"]:
            raise SnapshotError(f"protected: {fact['id']} does not match its prompt and answer")
    return manifest, blobs


def import_(ledger: Ledger, folder: str | Path) -> int:
    """Load a verified snapshot into an empty ledger (or one at version 0 of the same base);
    returns the head.  Nothing is written if any check fails."""
    manifest, blobs = verify(folder)
    pipe = ledger.redis.pipeline(transaction=True)
    try:
        pipe.watch(ledger.k_head)
        head = pipe.get(ledger.k_head)
        if head is not None:
            zero = Version.from_json(pipe.hget(ledger.k_versions, 0))
            if zero.base_hash != manifest["base_hash"]:
                raise LedgerMismatchError(
                    f"import: ledger {ledger.name!r} belongs to base {zero.base_hash[:16]}, "
                    f"the snapshot to {manifest['base_hash'][:16]}"
                )
            if int(head) != 0:
                raise SnapshotError(f"import: ledger {ledger.name!r} already has versions")
        pipe.multi()
        for record in manifest["edits"]:
            fields = {k: v for k, v in record.items() if k != "sha256"}
            pipe.hset(ledger.k_edits, record["id"], EditRecord(**fields).to_json())
            pipe.hset(ledger.k_blobs, record["id"], blobs[record["id"]])
        for v in manifest["versions"]:
            pipe.hset(ledger.k_versions, v["number"], Version.from_json(json.dumps(v)).to_json())
        for key, number in manifest["idempotency"].items():
            pipe.hset(ledger.k_idem, key, number)
        for path, digest in manifest.get("base_hashes", {}).items():
            pipe.hsetnx(ledger.k_base, path, digest)
        for report_id, report in manifest.get("reports", {}).items():
            pipe.hset(ledger.k_reports, report_id, json.dumps(report, sort_keys=True))
        protected = ProtectedFacts(ledger).k_facts
        for fact in manifest.get("protected", []):
            pipe.hset(protected, fact["id"], ProtectedFact(**fact).to_json())
        pipe.set(ledger.k_head, manifest["head"])
        pipe.publish(ledger.channel, manifest["head"])
        pipe.execute()
    except redis.WatchError as err:
        raise SnapshotError("import: the ledger changed meanwhile; nothing written") from err
    finally:
        pipe.reset()
    return int(manifest["head"])
