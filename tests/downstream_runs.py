"""Counting a downstream task's runs per user, shared by every test app (none imports tasks).

Each run writes a field of its own, so a write retried after a dropped
connection counts once: runs are the fields, not an increment.
"""

from __future__ import annotations

import uuid
from typing import Any


def note_run(client: Any, tag: str, user_id: str) -> None:
    """Count one run of a downstream task for ``user_id`` (noting which task ran)."""
    from celery import current_task

    task_id = getattr(getattr(current_task, "request", None), "id", None) or "-"
    client.hset(f"tests:downstream-runs:{tag}", f"{user_id}|{task_id}|{uuid.uuid4().hex}", 1)


def runs_by_user(client: Any, tag: str) -> dict[str, int]:
    """How many times each user's downstream task ran."""
    counts: dict[str, int] = {}
    for field in client.hkeys(f"tests:downstream-runs:{tag}"):
        user = field.decode().split("|", 1)[0]
        counts[user] = counts.get(user, 0) + 1
    return counts


def task_ids_by_user(client: Any, tag: str) -> dict[str, list[str]]:
    """The task ids of each user's downstream runs."""
    ids: dict[str, list[str]] = {}
    for field in client.hkeys(f"tests:downstream-runs:{tag}"):
        user, task_id, _ = field.decode().split("|")
        ids.setdefault(user, []).append(task_id)
    return ids
