"""mambazoo."""
