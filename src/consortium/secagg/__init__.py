"""consortium.secagg."""
