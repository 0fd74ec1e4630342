"""The command line: parse, call, exit. Nothing here computes or formats."""
