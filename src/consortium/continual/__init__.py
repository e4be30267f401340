"""consortium.continual."""
