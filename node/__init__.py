"""synthfed node."""
