"""Reply corruption for the hostile-reply tests: functions that take an encoded Flower reply (RecordDict, as
common.protocol.messages.encode makes it) and return a changed copy, applied after a real silo answered."""

from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict


def copy_record(c) -> RecordDict:
    out = RecordDict()
    for k, v in c.items():
        out[k] = v
    return out


def header(update):
    """A corruption that applies `update(h)` to the reply's decoded JSON header `h`."""
    def corrupt(c):
        h = json.loads(c.config_records["header"]["json"])
        update(h)
        out = copy_record(c)
        out["header"] = ConfigRecord({"type": c.config_records["header"]["type"], "json": json.dumps(h)})
        return out
    return corrupt


def set_field(key, value):
    return header(lambda h: h.__setitem__(key, value))


def users(field, value):
    """The `users` count of the header's aggregate `field` set to `value`."""
    return header(lambda h: h[field].__setitem__("users", value))


def arrays(group, update):
    """A corruption that applies `update(named)` to a copy of array group `group` ({name: numpy array})."""
    def corrupt(c):
        named = {n: a.numpy().copy() for n, a in c.array_records[f"arrays.{group}"].items()}
        update(named)
        out = copy_record(c)
        out[f"arrays.{group}"] = ArrayRecord({n: Array(np.ascontiguousarray(a)) for n, a in named.items()})
        return out
    return corrupt
