"""laser: LaSeR (Last-Token Self-Rewarding RL) as small pure functions plus the plumbing to run them.

Importing ``laser`` is light: the core math modules need only torch; the plumbing (models, generation,
DeepSpeed engine, verifier pool) is imported from its own submodule when needed.
"""

__version__ = "0.1.0"
