"""The command's exit codes: 0 ok, 1 a finding or a failure, 2 usage."""

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2
