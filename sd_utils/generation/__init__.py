"""Where a prompt becomes PNG files: requests, the run's steps, the checker and the output."""
