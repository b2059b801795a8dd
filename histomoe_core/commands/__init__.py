"""Sub-commands of the ``histomoe`` CLI (one module each)."""
