"""`python -m eval ARGS` is `hsd eval ARGS`."""
from .cli import main

main()
