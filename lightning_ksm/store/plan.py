"""What a complete harvest is, recorded in the manifest's ``harvest`` field and checked on load.

The harvest runner registers, before it writes any shard, the shards every loader of every split
must produce (``expected``: per split, per loader, the shard keys with their row counts and the
loader's sample count; an iterable dataset's count is filled in once rank 0 has read it) and the
number of ranks (``world``; chunk ``c`` of a loader belongs to rank ``c % world``). Each rank adds
itself to ``ranks_done`` when it has written all its shards; the rank that completes the set checks
that every expected shard is stored with its rows and only then sets ``complete`` (the completion
marker, written last). :func:`status` says what is missing, per split, per rank, per loader.

A store written shard by shard with :meth:`~lightning_ksm.store.FeatureStore.write_shard` and no
plan (``harvest`` is null) makes no claim either way; a format-1 store (written before plans
existed, also once migrated to the current format: ``migrated_from`` 1) is treated as possibly
incomplete.

The functions take the manifest as :meth:`~lightning_ksm.store.FeatureStore.manifest` returns it:
the store-level fields with every stored shard merged in under ``splits``.
"""

from __future__ import annotations

import re

from .errors import StoreError

__all__ = ["register_plan", "finish_rank", "status", "describe_status", "rank_of", "describe_left_out", "with_left_out"]

_CHUNK = re.compile(r"^l(\d+)-c(\d+)$")


def rank_of(key: str, world: int) -> int:
    """The rank that writes shard ``key`` (chunks of map-style loaders are dealt round robin)."""
    m = _CHUNK.match(key)
    return int(m.group(2)) % max(int(world), 1) if m else 0


def register_plan(data: dict, world: int, expected: dict) -> dict:
    """Record ``expected`` = ``{split: {loader: {"samples": n | None, "shards": {key: rows} | None}}}``
    and ``world`` in ``data`` (a manifest), or check them against the recorded plan: the same data
    must give the same shards, so a mismatch means the data changed since the harvest began."""
    plan = data.get("harvest")
    if plan is None:
        data["harvest"] = {"world": int(world), "expected": expected, "ranks_done": [], "complete": False}
        return data
    stored = plan["expected"]
    for split, loaders in expected.items():
        for loader, want in loaders.items():
            have = stored.setdefault(split, {}).setdefault(loader, want)
            if have is want:
                if plan.get("complete"):
                    raise StoreError(f"the harvest has no loader {loader!r} of split {split!r}: the data changed")
                continue
            if want["shards"] is not None and have["shards"] is not None and want != have:
                raise StoreError(
                    f"loader {loader!r} of split {split!r} now gives {want['samples']} samples in "
                    f"{len(want['shards'])} chunks, the harvest being resumed expected {have['samples']} in "
                    f"{len(have['shards'])}: the data or harvest_batch_size changed; harvest into a new "
                    "directory (or pass overwrite=True to the callback)"
                )
    if int(plan.get("world", 1)) != int(world):
        plan["world"], plan["ranks_done"] = int(world), []
    return data


def finish_rank(data: dict, rank: int, filled: dict | None = None) -> dict:
    """Mark ``rank`` done (with the counts of the iterable loaders it read, ``filled``); the rank
    that completes the set sets the completion marker when every expected shard is stored."""
    plan = data["harvest"]
    for split, loaders in (filled or {}).items():
        for loader, value in loaders.items():
            plan["expected"].setdefault(split, {})[loader] = value
    plan["ranks_done"] = sorted(set(plan.get("ranks_done", [])) | {int(rank)})
    if not status(data, marker=False)["problems"]:
        plan["complete"] = True
    return data


def status(data: dict, *, marker: bool = True) -> dict:
    """``{"recorded", "complete", "problems", "splits"}`` for a manifest (see the module docstring).

    ``complete`` is True, False, or None for a store without a plan (no claim).
    """
    if data.get("format_version") == 1 or data.get("migrated_from") == 1:
        return {"recorded": False, "complete": False, "splits": {},
                "problems": ["the store was written by an earlier lightning-ksm (format 1), which does not "
                             "record whether the harvest is complete"]}
    plan = data.get("harvest")
    if plan is None:
        return {"recorded": False, "complete": None, "problems": [], "splits": {}}
    world = int(plan.get("world", 1))
    problems, splits = [], {}
    missing_by_rank: dict = {}
    for split, loaders in sorted(plan["expected"].items()):
        stored = {s["key"]: s["rows"] for s in data["splits"].get(split, {"shards": []})["shards"]}
        want_samples, want_shards = 0, {}
        for loader, want in sorted(loaders.items()):
            if want["shards"] is None:
                problems.append(f"split {split!r}, loader {loader}: the (iterable) loader was not read to the end")
                continue
            want_samples += int(want["samples"])
            want_shards.update(want["shards"])
            missing = [k for k in want["shards"] if k not in stored]
            short = [k for k, rows in want["shards"].items() if k in stored and stored[k] != rows]
            if missing:
                problems.append(f"split {split!r}, loader {loader}: {len(missing)} of {len(want['shards'])} "
                                f"shards missing ({_keys(missing)})")
                for k in missing:
                    missing_by_rank.setdefault(rank_of(k, world), []).append(k)
            if short:
                problems.append(f"split {split!r}, loader {loader}: shards {_keys(short)} hold other row counts "
                                "than planned")
        extra = sorted(set(stored) - set(want_shards))
        if extra:
            problems.append(f"split {split!r}: shards {_keys(extra)} are not part of the recorded harvest")
        stored_samples = sum(rows for k, rows in stored.items() if k in want_shards)
        splits[split] = {"expected_samples": want_samples, "stored_samples": stored_samples,
                         "expected_shards": len(want_shards), "stored_shards": len(set(stored) & set(want_shards))}
        if stored_samples != want_samples:
            problems.append(f"split {split!r}: {stored_samples} of {want_samples} samples stored")
    for split in data["splits"]:
        if split not in plan["expected"] and data["splits"][split]["shards"]:
            problems.append(f"split {split!r} is not part of the recorded harvest")
    done = set(plan.get("ranks_done", []))
    for rank in range(world):
        if rank not in done:
            lost = missing_by_rank.get(rank, [])
            problems.append(f"rank {rank} of {world} did not finish" + (f" ({len(lost)} of its shards missing)"
                                                                         if lost else ""))
    complete = not problems and bool(plan.get("complete"))
    if marker and not problems and not plan.get("complete"):
        problems.append("the completion marker was never written")
    return {"recorded": True, "complete": complete, "problems": problems, "splits": splits}


def describe_status(st: dict) -> str:
    """One paragraph for an error or a report note."""
    counts = "; ".join(f"{split}: {v['stored_samples']} of {v['expected_samples']} samples, "
                       f"{v['stored_shards']} of {v['expected_shards']} shards" for split, v in st["splits"].items())
    text = "; ".join(st["problems"][:6]) + (f" (+{len(st['problems']) - 6} more)" if len(st["problems"]) > 6 else "")
    return text + (f". Stored: {counts}" if counts else "")


def describe_left_out(entry: dict) -> str:
    """One damaged shard that a partial load left out (an entry of ``FeatureStore.left_out``)."""
    return (f"shard {entry['key']!r} of split {entry['split']!r} is damaged and was left out ({entry['rows']} "
            f"samples of task(s) {_keys([str(v) for v in entry['task_values']])}): {entry['why']}")


def with_left_out(st: dict, left_out: list) -> dict:
    """``st`` (a :func:`status`) with the damaged shards a partial load left out: each is a problem,
    its samples are no longer counted as stored, and the harvest is no longer complete."""
    if not left_out:
        return st
    st = dict(st, complete=False, left_out=list(left_out), splits={k: dict(v) for k, v in st["splits"].items()})
    st["problems"] = [describe_left_out(e) for e in left_out] + list(st["problems"])
    for entry in left_out:
        if entry["split"] in st["splits"]:
            st["splits"][entry["split"]]["stored_samples"] -= entry["rows"]
            st["splits"][entry["split"]]["stored_shards"] -= 1
    return st


def _keys(keys: list, limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
