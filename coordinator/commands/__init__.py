"""One module per ``synthfed-coordinator`` command; each exposes ``register(app)``."""
