"""consortium.privacy."""
