"""One module per CLI subcommand; imported lazily so `dspark --help` stays fast."""
