"""synthfed protocols."""
