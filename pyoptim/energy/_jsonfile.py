"""``save(path)`` / ``load(path)`` for the energy records that round-trip through a dict
(``to_dict`` / ``from_dict``): a device spec, a layer profile, a clock plan."""
from __future__ import annotations

import json


class JsonFile:
    """A mixin: ``save`` writes ``to_dict()`` as JSON and returns the path; ``load`` reads it
    back through ``from_dict`` (which validates)."""

    def save(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        return path

    @classmethod
    def load(cls, path: str):
        with open(path) as f:
            return cls.from_dict(json.load(f))
