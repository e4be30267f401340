"""Edge vision: count vehicles on the device, send only counts (issue 9)."""
