"""`python -m vggjax convert|predict|export`: the `vggjax` command (vggjax.cli.main)."""
from vggjax.cli.main import main

main()
