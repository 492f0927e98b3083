"""The nightly run: reading the orders, placing each once, and its summary."""
