"""consortium.data."""
