"""Command-line subcommands, one module per area.

Every module in this package defines ``add_parser(subparsers)``, which registers one
or more subcommands and sets ``func`` (a callable taking the parsed ``args`` and
returning an exit code or None) as their default, and ``ORDER``, its place in
``moetrace --help`` (the workflow's order). ``moetrace.cli`` discovers the modules, so
adding a command never means editing a shared file. Parsers come from
:func:`moetrace.commands._help.add_command`, which ends every ``--help`` with examples.
"""
