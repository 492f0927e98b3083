"""Every name in ``tasks.__all__`` is really exported, and nothing public is left out of it."""

from __future__ import annotations

import tasks


def test_every_name_in_all_imports():
    """`from tasks import NAME` works for each name the package declares public."""
    missing = [name for name in tasks.__all__ if not hasattr(tasks, name)]
    assert missing == []


def test_star_import_gives_exactly_all():
    """`from tasks import *` raises nothing and binds each name of `__all__`."""
    namespace: dict[str, object] = {}
    exec("from tasks import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(tasks.__all__)


def test_all_is_sorted_and_unique():
    """One list, kept sorted, so a name added twice or out of place shows in review."""
    assert list(tasks.__all__) == sorted(set(tasks.__all__))


def test_public_members_are_all_listed():
    """The package's namespace holds no public name that `__all__` leaves out."""
    public = {
        name
        for name, value in list(vars(tasks).items())
        if not name.startswith("_") and not isinstance(value, type(tasks)) and name != "annotations"
    }
    assert public <= set(tasks.__all__)
