"""``python -m pyoptim.cli``: the ``pyoptim`` command."""
import sys

from . import main

sys.exit(main())
