"""One module per ``synthfed-node`` command; each exposes ``register(app)``."""
