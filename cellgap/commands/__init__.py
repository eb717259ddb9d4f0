"""The ``cellgap`` sub-commands, one module each (``add_arguments(parser)`` and ``run(args)``); ``cellgap.cli``
registers them."""
