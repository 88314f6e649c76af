"""CLI subcommands.  Each module defines ``register(subparsers)``, which adds its parser
and sets ``handler`` (a function ``(args) -> int``, may call ``trio.run``)."""
