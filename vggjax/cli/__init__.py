"""The `vggjax` command (`vggjax convert | predict | export`), installed with the package; in a
checkout `python tools/<name>.py` runs the same code. Each module parses one command's flags."""
