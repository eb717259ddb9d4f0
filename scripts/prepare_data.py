"""Download and/or convert a dataset into cellgap's prepared layout: the same as ``cellgap prepare``
(the code lives in ``cellgap/commands/prepare.py``; ``python scripts/prepare_data.py --help`` lists the options).

Example::

    python scripts/prepare_data.py folder --raw ~/my_tiles --out data/my_tiles --class-names tumour,immune --magnification 40
"""

import sys

from cellgap.commands.prepare import conversion_options, main, parse_args  # noqa: F401  (the script's interface)

if __name__ == "__main__":
    sys.exit(main())
