"""One module per ``exim-policy`` subcommand.

Each module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.
Modules import their heavy dependencies inside ``run`` so that start-up stays fast
(``exim-policy query`` is called once per recipient from Exim's ``${run}``).
"""

#: subcommand modules, in the order ``--help`` lists them
MODULES = (
    "serve",
    "check_config",
    "files",
    "forwardings",
    "query",
    "test",
    "accounts",
    "quarantine",
    "demo",
)
