"""consortium.dashboard."""
