"""Subcommands of the `spin-ray` CLI; each module has `add_parser(subparsers)`."""
