"""consortium.models."""
