"""consortium.federation."""
