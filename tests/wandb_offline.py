"""Read an offline W&B run directory (`wandb/offline-run-*/`) back, for tests: no network, no W&B server.

wandb 0.31 ships no Python reader of its run file any more (the internal process is the Go `wandb-core`), but it
ships the protobuf classes (`wandb.proto.wandb_internal_pb2.Record`), so only the container is parsed here. The
run file `run-<id>.wandb` is a LevelDB-log-style journal: a 7-byte header (b":W&B", uint16 LE magic 0xBEE1,
uint8 version 0), then 32 KiB blocks of chunks: uint32 LE CRC, uint16 LE length, uint8 type (1 FULL, 2 FIRST,
3 MIDDLE, 4 LAST) and the payload; CRC = crc32(payload, crc32(type byte)); block tails under 7 bytes are padding.
Each reassembled payload is one `Record`.

Read a run only after `wandb.teardown()` (cifar_tl.tracking.finish calls it): `run.finish()` returns before the
service process has written the file. Offline, artifact files are not in the run directory but in
`$WANDB_DATA_DIR/artifacts/staging` (the manifest's local_path): tests point WANDB_DATA_DIR at a temp dir."""
from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_payloads(path: str | Path) -> Iterator[bytes]:
    """The raw protobuf payload of every record in a .wandb file, in write order (CRCs checked)."""
    data = Path(path).read_bytes()
    if data[:_HEADER] != struct.pack("<4sHB", b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = _HEADER, None
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0 and length == 0 and crc == 0:  # zero-filled tail
            break
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: checksum mismatch at byte {pos}")
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = bytearray(chunk)
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += chunk
            if kind == _LAST:
                yield bytes(pending)
                pending = None
        else:
            raise ValueError(f"{path}: unexpected chunk type {kind} at byte {pos}")


def _path(item) -> list[str]:
    """An item's key path: wandb-core writes `nested_key` (["test/predictions", "path"]); keys contain "/"."""
    return list(item.nested_key) if item.nested_key else [item.key]


def _put(d: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        d = d.setdefault(part, {})
    d[path[-1]] = value


def _artifact(a) -> dict:
    files = {e.path: {"digest": e.digest, "size": e.size, "local_path": e.local_path or None,
                      "exists": bool(e.local_path) and Path(e.local_path).is_file()} for e in a.manifest.contents}
    return {"name": a.name, "type": a.type, "aliases": list(a.aliases), "client_id": a.client_id,
            "metadata": json.loads(a.metadata) if a.metadata else {}, "files": files}


def read_offline_run(run_dir: str | Path) -> dict:
    """{"run", "config", "history" (one dict per step), "summary", "artifacts", "media": {key: ref as logged},
    "record_types", "exit_code"} of an offline run directory, as plain Python values."""
    from wandb.proto import wandb_internal_pb2 as pb

    (run_file,) = Path(run_dir).glob("run-*.wandb")
    out: dict = {"run": None, "config": {}, "history": [], "summary": {}, "artifacts": [],
                 "record_types": Counter(), "exit_code": None}
    for payload in iter_payloads(run_file):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        out["record_types"][kind] += 1
        if kind == "run":
            out["run"] = {"id": record.run.run_id, "project": record.run.project, "name": record.run.display_name}
        elif kind == "config":
            for item in record.config.update:
                _put(out["config"], _path(item), json.loads(item.value_json))
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _put(row, _path(item), json.loads(item.value_json) if item.value_json else None)
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(out["summary"], _path(item), json.loads(item.value_json))
        elif kind == "artifact":
            out["artifacts"].append(_artifact(record.artifact))
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["media"] = {k: v for row in out["history"] for k, v in row.items() if isinstance(v, dict) and "_type" in v}
    return out


def load_logged_table(got: dict, key: str) -> dict:
    """A wandb.Table logged under `key` as {"columns", "data"}, each image cell with its PNG as "local_path".

    The copy in the run directory (files/media/table/) has every image cell replaced by the string "Image"; the
    full table and its PNGs are the files of the `run_table` artifact the history ref names by client id."""
    ref = got["media"][key]
    client_id, _, inner = ref["artifact_path"].partition("://")[2].partition("/")
    (art,) = [a for a in got["artifacts"] if a["client_id"] == client_id]
    table = json.loads(Path(art["files"][inner]["local_path"]).read_text())
    for row in table["data"]:
        for cell in row:
            if isinstance(cell, dict) and cell.get("_type") == "image-file":
                cell["local_path"] = art["files"][cell["path"]]["local_path"]
    return table
