"""synthfed privacy."""
