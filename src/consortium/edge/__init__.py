"""consortium.edge."""
