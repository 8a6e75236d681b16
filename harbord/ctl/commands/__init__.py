"""One module per harborctl subcommand: HELP, TIMEOUT, configure(parser), run(args, daemon)."""
