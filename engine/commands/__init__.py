"""Command-line subcommands, one module per area.

Every module in this package defines ``add_parser(subparsers)``, which registers one
or more subcommands and sets ``func`` (a callable taking the parsed ``args`` and
returning an exit code or None) as their default. ``moetrace.cli`` discovers the
modules, so adding a command never means editing a shared file.
"""
