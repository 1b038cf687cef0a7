"""`python -m decoder` runs ctd-decoder."""

from decoder.cli import main

main()
