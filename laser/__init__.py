"""laser: LaSeR (Last-Token Self-Rewarding RL) as small pure functions plus the plumbing to run them.

Importing ``laser`` is light: the core math modules need only torch; the plumbing (models, generation,
DeepSpeed engine, verifier pool) is imported from its own submodule when needed.
"""

__version__ = "0.1.0"

# The user-facing API (laser/api.py), imported on first use so that `import laser` stays light:
# laser.load(model_dir) -> LaserModel with .score(problem, response) and .solve(problem, k).
_API = ("load", "LaserModel", "Solution", "Sample", "Vote", "read_settings")


def __getattr__(name: str):
    if name in _API:
        from laser import api

        return getattr(api, name)
    raise AttributeError(f"module 'laser' has no attribute {name!r}")
