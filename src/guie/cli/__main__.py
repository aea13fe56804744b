"""`python -m guie.cli ...` (torchrun launches `-m guie.cli train ...` this way)."""
from . import main

main()
