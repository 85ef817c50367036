"""Every place a facade method takes a name, as a call: for the hostile-name tests.

Each site is ``call(operations, name)``: ``operations`` is a ``Database`` or a
``Transaction`` (``SAVEPOINT_SITES``: a ``Transaction``), ``name`` what the test puts
in that place.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

Call = Callable[[Any, Any], Any]

# Every position a name can take, through every facade method; n is the name.
COLUMN_SITES: Dict[str, Call] = {
    "find_one-where": lambda o, n: o.find_one("video_job", {n: 1}),
    "find_one-where-null": lambda o, n: o.find_one("video_job", {n: None}),
    "find_many-where": lambda o, n: o.find_many("video_job", {n: 1}),
    "find_many-where-op": lambda o, n: o.find_many("video_job", {n: (">", 1)}),
    "find_many-where-in": lambda o, n: o.find_many("video_job", {n: [1, 2]}),
    "find_many-where-second": lambda o, n: o.find_many(
        "video_job", {"id": 1, n: ("!=", None)}
    ),
    "count-where": lambda o, n: o.count("video_job", {n: 1}),
    "exists-where": lambda o, n: o.exists("video_job", {n: "x"}),
    "update-where": lambda o, n: o.update("video_job", {"status": "failed"}, {n: 1}),
    "delete-where": lambda o, n: o.delete("video_job", {n: 1}),
    "delete-where-in": lambda o, n: o.delete("video_job", {n: ["seed"]}),
    "insert-data": lambda o, n: o.insert("video_job", {"src_hash": "h", n: "x"}),
    "insert-data-only": lambda o, n: o.insert("video_job", {n: "seed2"}),
    "insert_many-data-copy": lambda o, n: o.insert_many(
        "video_job", [{"src_hash": "h1", n: "x"}, {"src_hash": "h2", n: "y"}]
    ),
    "insert_many-data-values": lambda o, n: o.insert_many(
        "video_job", [{"src_hash": "h1", n: [1]}], returning="id"
    ),
    "update-data": lambda o, n: o.update(
        "video_job", {n: "failed"}, {"src_hash": "seed"}
    ),
    "update-data-second": lambda o, n: o.update(
        "video_job", {"error": "e", n: "failed"}, {"src_hash": "seed"}
    ),
    "upsert-data": lambda o, n: o.upsert("video_job", {"src_hash": "seed", n: "x"}),
    "upsert-conflict": lambda o, n: o.upsert(
        "video_job", {"src_hash": "seed", n: "x"}, conflict=[n], update=["src_hash"]
    ),
    "upsert-update": lambda o, n: o.upsert(
        "video_job", {"src_hash": "seed", n: "x"}, update=[n]
    ),
    "find_one-columns": lambda o, n: o.find_one("video_job", columns=[n]),
    "find_many-columns": lambda o, n: o.find_many("video_job", columns=["id", n]),
    "find_many-columns-str": lambda o, n: o.find_many("video_job", columns=n),
    "insert-returning": lambda o, n: o.insert(
        "video_job", {"src_hash": "h"}, returning=n
    ),
    "insert-returning-list": lambda o, n: o.insert(
        "video_job", {"src_hash": "h"}, returning=["id", n]
    ),
    "insert_many-returning": lambda o, n: o.insert_many(
        "video_job", [{"src_hash": "h"}], returning=n
    ),
    "find_one-order_by": lambda o, n: o.find_one("video_job", order_by=n),
    "find_many-order_by-list": lambda o, n: o.find_many(
        "video_job", order_by=["id", n]
    ),
}
ORDER_SITES = {"find_one-order_by", "find_many-order_by-list"}
# Sites where n is the whole argument rather than one name in it: there None means
# "the default", a tuple is a list of names, and returning="*" is the whole row.
WHOLE_ARGUMENT_SITES = {
    "find_many-columns-str",
    "find_one-order_by",
    "insert-returning",
    "insert_many-returning",
}

TABLE_SITES: Dict[str, Call] = {
    "find_one": lambda o, t: o.find_one(t, {"id": 1}),
    "find_many": lambda o, t: o.find_many(t, order_by="id", limit=1),
    "count": lambda o, t: o.count(t),
    "exists": lambda o, t: o.exists(t, {"id": 1}),
    "insert": lambda o, t: o.insert(t, {"src_hash": "h"}),
    "insert-returning-none": lambda o, t: o.insert(
        t, {"src_hash": "h"}, returning=None
    ),
    "insert_many-copy": lambda o, t: o.insert_many(t, [{"src_hash": "h"}]),
    "insert_many-values": lambda o, t: o.insert_many(
        t, [{"src_hash": "h"}], returning="id"
    ),
    "update": lambda o, t: o.update(t, {"status": "failed"}, {"id": 1}),
    "update-all": lambda o, t: o.update(t, {"status": "failed"}, all_rows=True),
    "delete": lambda o, t: o.delete(t, {"id": 1}),
    "delete-all": lambda o, t: o.delete(t, all_rows=True),
    "upsert": lambda o, t: o.upsert(t, {"src_hash": "seed"}, conflict="src_hash"),
    "upsert-nothing": lambda o, t: o.upsert(
        t, {"src_hash": "seed"}, conflict="src_hash", update=()
    ),
}


SAVEPOINT_SITES: Dict[str, Call] = {
    "savepoint": lambda tx, n: tx.savepoint(n),
    "rollback_to_savepoint": lambda tx, n: tx.rollback_to_savepoint(n),
    "release_savepoint": lambda tx, n: tx.release_savepoint(n),
}
