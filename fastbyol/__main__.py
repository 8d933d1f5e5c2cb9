"""``python -m fastbyol`` (also what ``deepspeed -m fastbyol`` runs)."""
import sys

from .cli import main

sys.exit(main())
