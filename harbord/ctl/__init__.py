"""harborctl: the command-line client of harbord (entry point: harbord.ctl.main:main)."""

# Exit codes, as documented in harborctl(1).
EX_OK = 0
EX_FAILED = 1  # the command failed, or a backend is not healthy
EX_UNREACHABLE = 2  # nothing answers on harbord's socket
EX_USAGE = 64  # sysexits' EX_USAGE: the command line was wrong
