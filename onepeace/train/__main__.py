"""`torchrun --nproc_per_node N -m onepeace.train CONFIG` (or `python -m onepeace.train CONFIG`)."""
import sys

from .loop import main

sys.exit(main())
