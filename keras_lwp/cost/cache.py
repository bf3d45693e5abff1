"""The profile cache on disk: measured layer times, collective fits and step overheads, so a second
`parallelize` of the same model on the same machine profiles nothing.

One JSON file per machine context: the device kind (CPU model or GPU name), how many logical
devices of which type the process has, and the TensorFlow, Keras and keras_lwp versions (a new
TensorFlow may run the same layer differently). Inside it, entries are keyed by what was measured:
a layer's signature (class, configuration, shapes, weights) and its parallel configuration on a
named mesh, a collective on a mesh, the per-step overhead of `fit` for an optimizer.

The directory is `~/.cache/keras_lwp` unless the `KERAS_LWP_CACHE` environment variable or a
`cache_dir` argument says otherwise; `keras_lwp.clear_cache()` empties it. Pure Python.
"""

import hashlib
import json
import os
import tempfile

ENV_VAR = "KERAS_LWP_CACHE"


def cache_dir(path=None):
    """The cache directory: `path`, else $KERAS_LWP_CACHE, else ~/.cache/keras_lwp."""
    return os.path.expanduser(path or os.environ.get(ENV_VAR) or os.path.join("~", ".cache", "keras_lwp"))


def clear_cache(path=None):
    """Delete every stored profile (in `path` or the default cache directory); returns how many
    files were removed. The next profiled plan measures again."""
    directory = os.path.join(cache_dir(path), "profiles")
    removed = 0
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith(".json"):
                os.remove(os.path.join(directory, name))
                removed += 1
    return removed


def digest(value):
    """A short stable hash of a JSON-able value."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ProfileCache:
    """Measurements for one machine context, read from and written to one JSON file.

    `get(section, key)` / `put(section, key, value)`; `save()` merges with what other processes
    wrote meanwhile and replaces the file atomically.
    """

    def __init__(self, context, path=None):
        self.context = dict(context)
        self.path = os.path.join(cache_dir(path), "profiles", f"{digest(self.context)}.json")
        self._data = self._read()
        self._dirty = False

    def _read(self):
        try:
            with open(self.path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data.get("entries", {}) if data.get("context") == self.context else {}

    def get(self, section, key):
        return self._data.get(section, {}).get(key)

    def put(self, section, key, value):
        self._data.setdefault(section, {})[key] = value
        self._dirty = True

    def __len__(self):
        return sum(len(entries) for entries in self._data.values())

    def save(self):
        if not self._dirty:
            return
        merged = self._read()
        for section, entries in self._data.items():
            merged.setdefault(section, {}).update(entries)
        self._data = merged
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump({"context": self.context, "entries": merged}, f, indent=1, sort_keys=True)
        os.replace(temporary, self.path)
        self._dirty = False
