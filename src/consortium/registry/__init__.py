"""consortium.registry."""
