"""synthfed coordinator."""
