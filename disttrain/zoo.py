"""Where the main job finds its models: the ``disttrain.models`` entry-point group.

The model zoo (``models/`` in the repository, installed as the package ``disttrain_zoo``) is built
on the library and registers each model class under a name in pyproject.toml. The library never
imports the zoo by name - that would make the library depend on the zoo that depends on it - it
asks the entry-point registry, so the arrows point down and a third-party package can add a model
to the main job the same way:

    [project.entry-points."disttrain.models"]
    mymodel = "mypackage.models:MyModel"
"""
from __future__ import annotations

from importlib.metadata import entry_points

GROUP = "disttrain.models"
_loaded: dict = {}


def names() -> list:
    """The registered model names."""
    return sorted(ep.name for ep in entry_points(group=GROUP))


def model(name: str):
    """The model class registered as `name` (imported on first use)."""
    cls = _loaded.get(name)
    if cls is None:
        found = [ep for ep in entry_points(group=GROUP) if ep.name == name]
        if not found:
            raise ValueError(f"no model {name!r} in the {GROUP!r} entry points (registered: {names()}); "
                             "install disttrain (pip install .) so that its model zoo is registered")
        cls = _loaded[name] = found[0].load()
    return cls
